// Package grant is the hand-over of bandwidth the Kubernetes scheduler
// placed (a DRA ResourceClaim on the node's bandwidth device) from the
// node agent's DRA driver to the plugin and to the agent's reshape: one
// file per pod and claim, written when the kubelet prepares the claim
// (before the pod's sandbox, so before CNI ADD) and removed when it
// unprepares it.
//
//	<dir>/<pod UID>/<claim UID>.json  {"claim":"ns/name","ingressBits":0,"egressBits":400000000}
//
// A pod's grant is the sum over its claims, per direction. Where a pod has
// a grant in a direction it is the pod's request there, whatever its
// request annotation says: the scheduler counted the claim against the
// node's capacity, not the annotation.
//
// The package is files only (no Kubernetes client): the plugin links it.
package grant

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/atomicfile"
)

// Grant is one claim's bandwidth for one pod, bit/s (0: none that way).
type Grant struct {
	// Claim is the ResourceClaim as namespace/name, for logs and events.
	Claim       string `json:"claim"`
	IngressBits uint64 `json:"ingressBits"`
	EgressBits  uint64 `json:"egressBits"`
}

// Total is a pod's grants summed per direction.
type Total struct {
	IngressBits, EgressBits uint64
	// Claims are the claims it comes from, sorted.
	Claims []string
}

// Empty reports whether the pod has no grant.
func (t Total) Empty() bool { return len(t.Claims) == 0 }

// maxClaims bounds what one pod's directory may hold: the kubelet allows
// a few claims per pod, and a reader must not be made to read thousands.
const maxClaims = 32

// isUID says v is what a Kubernetes UID may look like here, a path
// component that cannot climb out of the directory: an ASCII letter or
// digit, then up to 127 of those or '-'. (Not a regexp: compiling one with
// that bound cost the plugin 0.7 ms of start-up in every call.)
func isUID(v string) bool {
	if len(v) == 0 || len(v) > 128 || v[0] == '-' {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '-') {
			return false
		}
	}
	return true
}

func check(what, v string) error {
	if !isUID(v) {
		return fmt.Errorf("grant: %s %q is not a Kubernetes UID", what, v)
	}
	return nil
}

// Write records claim claimUID's grant to pod podUID, replacing an
// earlier one of the same claim. Durable: a prepared claim survives the
// node's crash as the kubelet expects.
func Write(dir, podUID, claimUID string, g Grant) error {
	if err := check("pod UID", podUID); err != nil {
		return err
	}
	if err := check("claim UID", claimUID); err != nil {
		return err
	}
	data, err := json.Marshal(g)
	if err != nil {
		return err
	}
	pd := filepath.Join(dir, podUID)
	if err := os.MkdirAll(pd, 0o755); err != nil {
		return fmt.Errorf("grant: %w", err)
	}
	if _, err := atomicfile.Write(filepath.Join(pd, claimUID+".json"), data, atomicfile.Options{Perm: 0o644, IfChanged: true}); err != nil {
		return fmt.Errorf("grant: write %s of pod %s: %w", claimUID, podUID, err)
	}
	return nil
}

// Remove deletes claim claimUID's grant to pod podUID, and the pod's
// directory when it was the last; nothing there is not an error.
func Remove(dir, podUID, claimUID string) error {
	if err := check("pod UID", podUID); err != nil {
		return err
	}
	if err := check("claim UID", claimUID); err != nil {
		return err
	}
	pd := filepath.Join(dir, podUID)
	if _, err := atomicfile.Remove(filepath.Join(pd, claimUID+".json")); err != nil {
		return fmt.Errorf("grant: remove %s of pod %s: %w", claimUID, podUID, err)
	}
	if err := os.Remove(pd); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) {
		return fmt.Errorf("grant: %w", err)
	}
	return nil
}

// RemoveClaim deletes claim claimUID's grants to whichever pods hold
// them (the kubelet unprepares a claim by its UID alone) and returns how
// many it removed; none is not an error.
func RemoveClaim(dir, claimUID string) (int, error) {
	if err := check("claim UID", claimUID); err != nil {
		return 0, err
	}
	pods, err := Pods(dir)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, p := range pods {
		if _, err := os.Lstat(filepath.Join(dir, p, claimUID+".json")); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err := Remove(dir, p, claimUID); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// RemovePod deletes every grant of pod podUID (its pod is gone, and the
// kubelet will not unprepare its claims any more).
func RemovePod(dir, podUID string) error {
	if err := check("pod UID", podUID); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(dir, podUID)); err != nil {
		return fmt.Errorf("grant: %w", err)
	}
	return atomicfile.SyncDir(dir)
}

// ForPod sums pod podUID's grants. No directory, or an empty podUID (a
// runtime that sends none), is no grant. A file that does not decode is
// an error naming it: guessing a pod's guarantee is worse than failing.
func ForPod(dir, podUID string) (Total, error) {
	var t Total
	if podUID == "" || dir == "" {
		return t, nil
	}
	if err := check("pod UID", podUID); err != nil {
		return t, err
	}
	pd := filepath.Join(dir, podUID)
	entries, err := os.ReadDir(pd)
	if errors.Is(err, fs.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return t, fmt.Errorf("grant: %w", err)
	}
	n := 0
	for _, e := range entries {
		name := e.Name()
		if !e.Type().IsRegular() || !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue
		}
		if n++; n > maxClaims {
			return Total{}, fmt.Errorf("grant: pod %s has more than %d claims in %s", podUID, maxClaims, pd)
		}
		var g Grant
		data, err := os.ReadFile(filepath.Join(pd, name))
		if err != nil {
			return Total{}, fmt.Errorf("grant: %w", err)
		}
		if err := json.Unmarshal(data, &g); err != nil {
			return Total{}, fmt.Errorf("grant: %s: %w", filepath.Join(pd, name), err)
		}
		t.IngressBits += g.IngressBits
		t.EgressBits += g.EgressBits
		claim := g.Claim
		if claim == "" {
			claim = strings.TrimSuffix(name, ".json")
		}
		t.Claims = append(t.Claims, claim)
	}
	slices.Sort(t.Claims)
	return t, nil
}

// Pods lists the pod UIDs that have a directory in dir (for the agent's
// collection of grants whose pod is gone).
func Pods(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("grant: %w", err)
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() && isUID(e.Name()) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
