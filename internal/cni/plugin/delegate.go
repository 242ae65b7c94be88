package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// The delegation below replaces the CNI library's invoke package, which
// links an HTTP and tracing stack into the plugin and costs every pod start
// its initialisation. Semantics follow the spec: the delegate is found in
// CNI_PATH, gets our environment with CNI_COMMAND set, and our stdin.

// findPlugin resolves a plugin type in CNI_PATH.
func findPlugin(pluginType string) (string, error) {
	if pluginType == "" || strings.ContainsAny(pluginType, `/\`) || pluginType == "." || pluginType == ".." {
		return "", types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("invalid ipam.type %q: not a plugin name", pluginType), "")
	}
	dirs := filepath.SplitList(os.Getenv("CNI_PATH"))
	for _, d := range dirs {
		p := filepath.Join(d, pluginType)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("invalid ipam.type %q: no such plugin in CNI_PATH %v", pluginType, dirs), "")
}

// delegate runs another plugin for one command and returns its stdout.
func delegate(ctx context.Context, command, pluginType string, stdin []byte) ([]byte, error) {
	path, err := findPlugin(pluginType)
	if err != nil {
		return nil, err
	}
	env := make([]string, 0, len(os.Environ())+1)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CNI_COMMAND=") {
			env = append(env, kv)
		}
	}
	env = append(env, "CNI_COMMAND="+command)
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		e := &types.Error{}
		if jerr := json.Unmarshal(stdout.Bytes(), e); jerr == nil && (e.Code != 0 || e.Msg != "") {
			return nil, e
		}
		return nil, fmt.Errorf("%s %s: %w: %s", pluginType, command, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// delegateAdd runs ADD and decodes the result in the config's version.
func delegateAdd(ctx context.Context, pluginType, cniVersion string, stdin []byte) (*current.Result, error) {
	out, err := delegate(ctx, "ADD", pluginType, stdin)
	if err != nil {
		return nil, err
	}
	r, err := version.NewResult(cniVersion, out)
	if err != nil {
		return nil, fmt.Errorf("decode %s result: %w", pluginType, err)
	}
	return current.NewResultFromResult(r)
}
