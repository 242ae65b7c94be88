package nodenet

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"k8s.io/client-go/kubernetes"

	"github.com/qoscni/qoscni/internal/cni/podnet"
)

// ModeEnv sets the agent's --pod-routes default.
const ModeEnv = "QOSCNI_POD_ROUTES"

// AgentConfig is what the node agent gives StartAgent.
type AgentConfig struct {
	Mode     Mode
	Client   kubernetes.Interface
	NodeName string
	// NetnsFd is the node's network namespace (-1 = the agent's own).
	NetnsFd    int
	Resync     time.Duration // 0 = DefaultResync
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// StartAgent runs the Watcher for the agent in the node namespace: routes
// of the mode (hostgw, vxlan or auto), and the cluster's pod CIDRs out of
// ipMasq. In modes vxlan and auto the agent patches its own Node's
// VTEPMACAnnotation, so its ServiceAccount needs "patch" on nodes. stop waits for
// it after ctx ended and releases the netlink handle; routes stay in the
// kernel (pods keep talking while the agent restarts).
func StartAgent(ctx context.Context, cfg AgentConfig) (stop func(), err error) {
	if cfg.Mode != ModeHostGW && cfg.Mode != ModeVXLAN && cfg.Mode != ModeAuto {
		return nil, fmt.Errorf("pod routes: mode %q is not supported", cfg.Mode)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	var h *netlink.Handle
	if cfg.NetnsFd >= 0 {
		h, err = netlink.NewHandleAt(vnetns.NsHandle(cfg.NetnsFd))
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("pod routes: netlink: %w", err)
	}
	masq, err := podnet.NewMasq(cfg.NetnsFd)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("pod routes: %w", err)
	}
	w, err := NewWatcher(WatcherConfig{
		Client: cfg.Client, NodeName: cfg.NodeName, Routes: NewRoutesMode(h, cfg.NodeName, cfg.Mode), Masq: masq,
		Resync: cfg.Resync, Registerer: cfg.Registerer, Logger: cfg.Logger,
	})
	if err != nil {
		h.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := w.Run(ctx); err != nil && ctx.Err() == nil {
			cfg.Logger.Error("pod routes stopped", "err", err)
		}
	}()
	return func() {
		<-done
		h.Close()
	}, nil
}
