package state

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/qoscni/qoscni/internal/atomicfile"
	"github.com/qoscni/qoscni/internal/paths"
)

// The registry of state directories. stateDir is a per-network key, and
// the network config the plugin ran with is not always one the node agent
// can read: a Multus NetworkAttachmentDefinition lives in the API, a
// conflist may be removed while its pods still run. An agent that does
// not know a directory cannot remove what a stale attachment recorded
// there, nor repair or reshape it. So the plugin's ADD registers the
// directory it writes records to (one stat when it is registered
// already), in one fixed place the agent reads besides its own
// --state-dir and the stateDirs of the conflists it finds.
//
// One file per directory, named by a hash of the path and holding the
// path, so that registering is idempotent and concurrent ADDs need no
// lock: two writers of one entry write the same content, by rename.
// Entries are never removed by the plugin; a directory that no longer
// exists costs the agent one failed open per pass.
const (
	// DefaultRegistryDir sits beside the default state directory, under
	// paths.DataDir, which the agent's DaemonSet mounts.
	DefaultRegistryDir = paths.RegistryDir
	// RegistryEnv overrides DefaultRegistryDir for the plugin: kernel
	// tests give each node namespace its own registry, so that no test
	// writes to the machine's /var/lib/cni.
	RegistryEnv = "QOSCNI_STATE_REGISTRY"

	registrySuffix = ".dir"
)

// RegistryDir is the registry the plugin writes to: $QOSCNI_STATE_REGISTRY,
// else DefaultRegistryDir.
func RegistryDir() string {
	if d := os.Getenv(RegistryEnv); d != "" {
		return d
	}
	return DefaultRegistryDir
}

func registryEntry(registry, dir string) string {
	sum := sha256.Sum256([]byte(dir))
	return filepath.Join(registry, hex.EncodeToString(sum[:16])+registrySuffix)
}

// Register records dir (an absolute path) in registry.
func Register(registry, dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("register state dir %q: not an absolute path", dir)
	}
	dir = filepath.Clean(dir)
	p := registryEntry(registry, dir)
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if err := os.MkdirAll(registry, 0o700); err != nil {
		return fmt.Errorf("register state dir %s: %w", dir, err)
	}
	// Durable: the records it leads to are, and it is written once per
	// directory, ever.
	if _, err := atomicfile.Write(p, []byte(dir+"\n"), atomicfile.Options{Perm: 0o600}); err != nil {
		return fmt.Errorf("register state dir %s: %w", dir, err)
	}
	return nil
}

// RegisteredDirs lists the directories of registry ("" or a missing
// registry: none). An entry that does not hold one absolute path is
// reported in errs and skipped.
func RegisteredDirs(registry string) (dirs []string, errs []error) {
	if registry == "" {
		return nil, nil
	}
	entries, err := os.ReadDir(registry)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{fmt.Errorf("read state dir registry %s: %w", registry, err)}
	}
	for _, e := range entries {
		// atomicfile's temporary names start with a dot.
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") || !strings.HasSuffix(e.Name(), registrySuffix) {
			continue
		}
		p := filepath.Join(registry, e.Name())
		data, err := os.ReadFile(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("state dir registry: %w", err))
			continue
		}
		dir := strings.TrimSuffix(string(data), "\n")
		if !filepath.IsAbs(dir) || strings.ContainsAny(dir, "\n\x00") {
			errs = append(errs, fmt.Errorf("state dir registry: %s does not hold an absolute path", p))
			continue
		}
		dirs = append(dirs, filepath.Clean(dir))
	}
	return dirs, errs
}
