// Package plugin implements the CNI commands of qoscni: it parses the
// typed configuration and calls the wiring, IPAM and state packages.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/podnet"
	"github.com/qoscni/qoscni/internal/fault"
	"github.com/qoscni/qoscni/internal/journal"
	"github.com/qoscni/qoscni/internal/state"
	"github.com/qoscni/qoscni/ipam"
)

// Plugin holds what the commands share. Log goes to stderr, which runtimes
// capture into their own logs.
type Plugin struct {
	Log *slog.Logger
	// StateRegistry is where ADD registers the network's stateDir for the
	// node agent (state.Register); "" = nowhere.
	StateRegistry string
}

// ErrAttachmentExists is qoscni's own CNI error code (the spec leaves 100
// and above to plugins) for an ADD of an attachment that is already set up:
// none of the spec's codes says it, and the runtime's answer is a DEL first.
const ErrAttachmentExists = 100

// LogLevelEnv selects the plugin's log level (debug, info, warn, error).
// At debug every command logs how long each of its steps took.
const LogLevelEnv = "QOSCNI_LOG_LEVEL"

// New returns a plugin logging to stderr.
func New() *Plugin {
	level := slog.LevelWarn
	if v := os.Getenv(LogLevelEnv); v != "" {
		_ = level.UnmarshalText([]byte(v))
	}
	return &Plugin{Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})), StateRegistry: state.RegistryDir()}
}

// registerStateDir makes the network's stateDir known to the node agent
// before a record of it is written. A failure does not fail the ADD: the
// agent never deletes the devices of a live pod whatever it knows, and a
// conflist naming the directory still leads it there; what waits is the
// agent's cleanup of the attachment after its pod is gone.
func (p *Plugin) registerStateDir(dir string) {
	if p.StateRegistry == "" {
		return
	}
	if err := state.Register(p.StateRegistry, dir); err != nil {
		p.Log.Warn("the node agent may not find this network's records", "err", err)
	}
}

// steps records the duration of each step of one command for debug logs.
// Steps that run at once mark themselves with markTook.
type steps struct {
	log   *slog.Logger
	op    string
	start time.Time
	mu    sync.Mutex
	last  time.Time
	attrs []any
}

func (p *Plugin) steps(op string) *steps {
	now := time.Now()
	return &steps{log: p.Log, op: op, start: now, last: now}
}

// mark ends a step. Each step changes the kernel or the disk, so the
// reliability tests may kill the plugin here (internal/fault).
func (s *steps) mark(name string) {
	fault.At(s.op, name)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	s.attrs = append(s.attrs, name, now.Sub(s.last))
	s.last = now
}

// markTook ends a step that measured its own time (it may have run beside
// others, from any goroutine).
func (s *steps) markTook(name string, took time.Duration) {
	fault.At(s.op, name)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.attrs = append(s.attrs, name, took)
	s.last = time.Now()
}

func (s *steps) done() {
	if s.log.Enabled(context.Background(), slog.LevelDebug) {
		s.log.Debug(s.op, append(s.attrs, "total", time.Since(s.start))...)
	}
}

// Funcs binds the commands for the call journal (journal.Wrap makes them
// skel's). Each call's stdin is parsed here, once: the command gets the
// typed config, the journal the network it named, also when it was refused.
func (p *Plugin) Funcs() journal.Funcs {
	return journal.Funcs{
		Add:    p.strict(p.Add),
		Del:    forDel(p.Del),
		Check:  p.strict(p.Check),
		GC:     p.strict(p.GC),
		Status: p.strict(p.Status),
	}
}

// command is a CNI command given its parsed config and pod identity.
type command func(*skel.CmdArgs, *netconf.NetConf, netconf.PodArgs) error

// strict runs cmd on a config netconf.Parse accepted, with CNI_ARGS.
func (p *Plugin) strict(cmd command) journal.Cmd {
	return func(args *skel.CmdArgs) (journal.Network, error) {
		conf, pod, n, err := p.parse(args)
		if err != nil {
			return n, err
		}
		return n, cmd(args, conf, pod)
	}
}

// forDel runs DEL on what netconf.ParseForDel makes of the config: DEL
// needs no pod identity from CNI_ARGS, and a config ADD refused must not
// make DEL fail forever.
func forDel(del func(*skel.CmdArgs, *netconf.NetConf) error) journal.Cmd {
	return func(args *skel.CmdArgs) (journal.Network, error) {
		conf, h, err := netconf.ParseForDel(args.StdinData)
		n := journal.Network{Name: h.Name, StateDir: h.StateDir}
		if err != nil {
			return n, err
		}
		return n, del(args, conf)
	}
}

// delegateTimeout bounds a delegated IPAM plugin call.
const delegateTimeout = 60 * time.Second

// addrSource is the IPAM of one network config: ours or a delegate.
type addrSource struct {
	conf  *netconf.NetConf
	alloc *ipam.Allocator
}

func newAddrSource(conf *netconf.NetConf) (*addrSource, error) {
	s := &addrSource{conf: conf}
	if conf.IPAMStoreOnly {
		a, err := ipam.OpenStore(conf.IPAMStoreDir, conf.Name)
		if err != nil {
			return nil, err
		}
		s.alloc = a
		return s, nil
	}
	if conf.BuiltinIPAM() {
		a, err := ipam.New(conf.IPAMConfig, conf.Name)
		if err != nil {
			return nil, err
		}
		s.alloc = a
	}
	return s, nil
}

// allocate returns the attachment's addresses and the IPAM routes.
func (s *addrSource) allocate(containerID, ifName string) ([]*current.IPConfig, []*types.Route, *types.DNS, error) {
	if s.alloc == nil && s.conf.IPAM.Type == "" {
		return nil, nil, nil, netconf.InvalidField("ipam", "(absent)", "standalone mode needs an ipam section with ranges")
	}
	if s.alloc != nil {
		ips, err := s.alloc.Allocate(containerID, ifName)
		if errors.Is(err, ipam.ErrNoFreeAddress) {
			// The code STATUS answers while a range is full: the plugin
			// cannot serve ADD until addresses are freed.
			return nil, nil, nil, types.NewError(types.ErrPluginNotAvailable,
				fmt.Sprintf("allocate addresses for %s/%s: %v", containerID, ifName, err), "")
		}
		if err != nil {
			return nil, nil, nil, fmt.Errorf("allocate addresses for %s/%s: %w", containerID, ifName, err)
		}
		return ips, s.conf.IPAMConfig.Routes, nil, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), delegateTimeout)
	defer cancel()
	res, err := delegateAdd(ctx, s.conf.IPAM.Type, s.conf.CNIVersion, s.conf.Raw)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("ipam plugin %s ADD: %w", s.conf.IPAM.Type, err)
	}
	if len(res.IPs) == 0 {
		return nil, nil, nil, fmt.Errorf("ipam plugin %s returned no addresses", s.conf.IPAM.Type)
	}
	return res.IPs, res.Routes, &res.DNS, nil
}

// Get returns the addresses the built-in allocator holds (nil for a
// delegate). With Release it makes the source teardown's IPAM.
func (s *addrSource) Get(containerID, ifName string) ([]net.IP, error) {
	if s.alloc == nil {
		return nil, nil
	}
	return s.alloc.Get(containerID, ifName)
}

// Owner says which attachment the built-in store gives ip to now (false
// for a delegate, which cannot say).
func (s *addrSource) Owner(ip net.IP) (ipam.Attachment, bool) {
	if s.alloc == nil {
		return ipam.Attachment{}, false
	}
	return s.alloc.Owner(ip)
}

// release is Release with the attachment named, for ADD's rollback
// (teardown names it itself).
func (s *addrSource) release(containerID, ifName string) error {
	if err := s.Release(containerID, ifName); err != nil {
		return fmt.Errorf("release addresses of %s/%s: %w", containerID, ifName, err)
	}
	return nil
}

// Release frees the attachment's addresses: the built-in allocator's, or
// the delegated plugin's DEL.
func (s *addrSource) Release(containerID, ifName string) error {
	if s.alloc == nil && (s.conf.IPAM.Type == "" || s.conf.IPAMStoreOnly) {
		return nil
	}
	if s.alloc != nil {
		return s.alloc.Release(containerID, ifName)
	}
	ctx, cancel := context.WithTimeout(context.Background(), delegateTimeout)
	defer cancel()
	if err := ignoreOut(delegate(ctx, "DEL", s.conf.IPAM.Type, s.conf.Raw)); err != nil {
		return fmt.Errorf("ipam plugin %s DEL: %w", s.conf.IPAM.Type, err)
	}
	return nil
}

// undo collects rollback steps of a half-done ADD, run in reverse.
type undo []func() error

func (u *undo) push(f func() error) { *u = append(*u, f) }

func (u undo) run(log *slog.Logger) {
	for i := len(u) - 1; i >= 0; i-- {
		if err := u[i](); err != nil {
			log.Warn("rollback step failed", "err", err)
		}
	}
}

// parse reads stdin and CNI_ARGS; the network is what the journal files
// the call under, as far as stdin could be read.
func (p *Plugin) parse(args *skel.CmdArgs) (*netconf.NetConf, netconf.PodArgs, journal.Network, error) {
	conf, h, err := netconf.Parse(args.StdinData)
	n := journal.Network{Name: h.Name, StateDir: h.StateDir}
	if err != nil {
		return nil, netconf.PodArgs{}, n, err
	}
	if len(conf.UnknownKeys) > 0 {
		p.Log.Warn("ignoring keys of the qoscni config that qoscni does not read (fine if another tool reads them)",
			"network", conf.Name, "keys", strings.Join(conf.UnknownKeys, ", "))
	}
	pod, err := netconf.ParseArgs(args.Args)
	if err != nil {
		return nil, netconf.PodArgs{}, n, err
	}
	return conf, pod, n, nil
}

func hostHandle() (*netlink.Handle, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	return h, nil
}

// isGone reports errors that mean "the thing DEL would remove is already gone".
func isGone(err error) bool {
	return errors.Is(err, podnet.ErrNetNSGone) || errors.Is(err, os.ErrNotExist)
}

func ignoreOut(_ []byte, err error) error { return err }
