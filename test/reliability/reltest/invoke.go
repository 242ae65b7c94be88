package reltest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/internal/testnet"
)

// Call is one plugin invocation.
type Call struct {
	Command, ContainerID, Netns, IfName, Args string
	Config                                    []byte
	Env                                       []string // extra variables for the plugin
	Umask0                                    bool     // run the plugin under umask 000
	// Started, when set, is called once the plugin runs, with its PID
	// (`ip netns exec` execs it, so the PID is the plugin's) and the
	// buffer its stderr goes to; the func it returns is called when the
	// plugin has exited, before Invoke returns.
	Started func(pid int, stderr *bytes.Buffer) (exited func())
}

// Outcome is how an invocation ended and how long it took.
type Outcome struct {
	Stdout, Stderr []byte
	Err            *types.Error // nil on success
	Took           time.Duration
	Hung           bool // killed by the test's deadline
}

func (o Outcome) String() string {
	switch {
	case o.Hung:
		return fmt.Sprintf("hung: killed after %v", o.Took.Round(time.Millisecond))
	case o.Err != nil:
		return fmt.Sprintf("error %d: %s (%s); stderr %q", o.Err.Code, o.Err.Msg, o.Err.Details, o.Stderr)
	}
	return "ok"
}

// Invoke runs the built plugin (testnet.PluginBinary) inside the node
// namespace as testnet.Invoke does, but kills it after limit so that a
// hang is a failure, not a stuck test. The measured time includes
// `ip netns exec`, as a runtime's fork and exec would.
func Invoke(t testing.TB, n *testnet.Node, c Call, limit time.Duration) Outcome {
	t.Helper()
	bin := testnet.PluginBinary(t)
	env := append([]string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=" + c.Command, "CNI_PATH=" + filepath.Dir(bin),
		state.RegistryEnv + "=" + n.Registry}, c.Env...)
	for k, v := range map[string]string{"CNI_CONTAINERID": c.ContainerID, "CNI_NETNS": c.Netns, "CNI_IFNAME": c.IfName, "CNI_ARGS": c.Args} {
		if v != "" {
			env = append(env, k+"="+v)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	argv := []string{"netns", "exec", n.Name, bin}
	if c.Umask0 {
		argv = []string{"netns", "exec", n.Name, "sh", "-c", `umask 000 && exec "$0"`, bin}
	}
	cmd := exec.CommandContext(ctx, "ip", argv...)
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(c.Config)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Start()
	if err == nil {
		var exited func()
		if c.Started != nil {
			exited = c.Started(cmd.Process.Pid, &stderr)
		}
		err = cmd.Wait()
		if exited != nil {
			exited()
		}
	}
	o := Outcome{Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Took: time.Since(start)}
	if err == nil {
		return o
	}
	if ctx.Err() != nil {
		o.Hung = true
		o.Err = &types.Error{Code: 999, Msg: "killed by the test deadline"}
		return o
	}
	e := &types.Error{}
	if jerr := json.Unmarshal(o.Stdout, e); jerr != nil || (e.Code == 0 && e.Msg == "") {
		e = &types.Error{Code: 999, Msg: fmt.Sprintf("plugin exited %v without a CNI error; stdout %q", err, o.Stdout)}
	}
	o.Err = e
	return o
}

// Addrs decodes the IPs of an ADD result.
func Addrs(stdout []byte) ([]string, error) {
	res, err := version.NewResult(CNIVersion, stdout)
	if err != nil {
		return nil, fmt.Errorf("decode ADD result: %v\n%s", err, stdout)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("convert ADD result: %v", err)
	}
	var out []string
	for _, ipc := range cur.IPs {
		out = append(out, ipc.Address.IP.String())
	}
	return out, nil
}
