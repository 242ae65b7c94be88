package dra

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"time"

	"github.com/go-logr/logr"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"

	"github.com/qoscni/qoscni/internal/agent/cniconf"
	"github.com/qoscni/qoscni/internal/grant"
)

// DefaultKubeletDir is the kubelet's --root-dir on most nodes.
const DefaultKubeletDir = "/var/lib/kubelet"

// Config is the driver's configuration.
type Config struct {
	DriverName string // "" = DefaultDriverName
	NodeName   string
	Client     kubernetes.Interface
	// KubeletDir is the kubelet's root directory: the driver registers in
	// its plugins_registry and serves in plugins/<driver name>.
	KubeletDir string
	// GrantDir is where prepared claims are handed to the plugin
	// (paths.GrantDirOf of the state registry).
	GrantDir string
	// CNIConfDir holds qoscni's network, whose nodeCapacity the devices
	// publish; it is read again every RefreshInterval.
	CNIConfDir      string
	RefreshInterval time.Duration // 0 = 30 s
	Policy          Policy
	Logger          *slog.Logger
}

// Driver is a running DRA driver.
type Driver struct {
	cfg    Config
	helper *kubeletplugin.Helper
	mu     sync.Mutex
	// published is the last device list handed to the slice controller.
	published []resourceapi.Device
}

// ErrNoAPI says the cluster serves no resource.k8s.io/v1 (Kubernetes
// before 1.34, or DRA turned off): there is nothing to drive.
var ErrNoAPI = errors.New("the API server does not serve resource.k8s.io/v1")

// Start registers the driver with the kubelet, publishes the node's
// devices and keeps them current until ctx ends or Stop. ErrNoAPI says
// the cluster has no DRA; any other error may pass (Run retries).
func Start(ctx context.Context, cfg Config) (*Driver, error) {
	if cfg.DriverName == "" {
		cfg.DriverName = DefaultDriverName
	}
	if cfg.KubeletDir == "" {
		cfg.KubeletDir = DefaultKubeletDir
	}
	if cfg.RefreshInterval <= 0 {
		cfg.RefreshInterval = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := cfg.Policy.Check(); err != nil {
		return nil, fmt.Errorf("dra: %w", err)
	}
	if _, err := cfg.Client.Discovery().ServerResourcesForGroupVersion(resourceapi.SchemeGroupVersion.String()); apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("dra: %w (%v)", ErrNoAPI, err)
	} else if err != nil {
		return nil, fmt.Errorf("dra: API discovery: %w", err)
	}
	// The helper logs through klog: into the agent's JSON log.
	klog.SetLogger(logr.FromSlogHandler(cfg.Logger.With("component", "dra").Handler()))
	registry := filepath.Join(cfg.KubeletDir, "plugins_registry")
	data := filepath.Join(cfg.KubeletDir, "plugins", cfg.DriverName)
	if err := os.MkdirAll(data, 0o750); err != nil {
		return nil, fmt.Errorf("dra: %w", err)
	}
	if _, err := os.Stat(registry); err != nil {
		return nil, fmt.Errorf("dra: the kubelet's plugin registry (is --kubelet-dir its --root-dir?): %w", err)
	}
	d := &Driver{cfg: cfg}
	var nodeUID types.UID
	if n, err := cfg.Client.CoreV1().Nodes().Get(ctx, cfg.NodeName, metav1.GetOptions{}); err == nil {
		nodeUID = n.UID
	}
	h, err := kubeletplugin.Start(klog.NewContext(ctx, klog.Background()), d,
		kubeletplugin.DriverName(cfg.DriverName),
		kubeletplugin.NodeName(cfg.NodeName),
		kubeletplugin.NodeUID(nodeUID),
		kubeletplugin.KubeClient(cfg.Client),
		kubeletplugin.RegistrarDirectoryPath(registry),
		kubeletplugin.PluginDataDirectoryPath(data),
		kubeletplugin.HealthService(false),
	)
	if err != nil {
		return nil, fmt.Errorf("dra: %w", err)
	}
	d.helper = h
	if err := d.refresh(ctx); err != nil {
		h.Stop()
		return nil, err
	}
	go d.loop(ctx)
	cfg.Logger.Info("DRA driver registered", "driver", cfg.DriverName, "registry", registry, "devices", d.deviceNames())
	return d, nil
}

// loop republishes the devices when qoscni's network changes its
// capacity (a new nodeCapacity in the ConfigMap, rewritten by install).
func (d *Driver) loop(ctx context.Context) {
	t := time.NewTicker(d.cfg.RefreshInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := d.refresh(ctx); err != nil {
				d.cfg.Logger.Warn("DRA: reading the node capacity", "err", err)
			}
		}
	}
}

// refresh publishes the devices of the network's current capacity, when
// they changed. A network without capacity publishes none: its pods have
// no guarantees to place.
func (d *Driver) refresh(ctx context.Context) error {
	b, found, err := cniconf.NodeBandwidth(d.cfg.CNIConfDir)
	if err != nil {
		return fmt.Errorf("dra: %w", err)
	}
	devs := Devices(b.Capacity, b.MaxRequestBits, d.cfg.Policy)
	if devs == nil {
		devs = []resourceapi.Device{} // published: none, as opposed to not yet
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.published != nil && reflect.DeepEqual(devs, d.published) {
		return nil
	}
	if len(devs) == 0 {
		d.cfg.Logger.Warn("DRA: qoscni's network has no nodeCapacity: the node offers no bandwidth to claims", "found", found, "file", b.File)
	}
	res := resourceslice.DriverResources{Pools: map[string]resourceslice.Pool{
		d.cfg.NodeName: {Slices: []resourceslice.Slice{{Devices: devs}}},
	}}
	if err := d.helper.PublishResources(ctx, res); err != nil {
		return fmt.Errorf("dra: publish: %w", err)
	}
	d.published = devs
	d.cfg.Logger.Info("DRA: published the node's bandwidth", "devices", d.deviceNamesLocked(), "file", b.File)
	return nil
}

func (d *Driver) deviceNames() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.deviceNamesLocked()
}

func (d *Driver) deviceNamesLocked() []string {
	var out []string
	for _, dev := range d.published {
		q := dev.Capacity[CapacityName].Value
		out = append(out, dev.Name+"="+q.String())
	}
	return out
}

// Stop unregisters from the kubelet and stops publishing. The slice stays:
// a restarting agent must not make the scheduler forget the node.
func (d *Driver) Stop() {
	d.helper.Stop()
}

// PrepareResourceClaims hands each claim's bandwidth to its pod.
func (d *Driver) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	out := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	for _, c := range claims {
		g, err := grantOf(c, d.cfg.DriverName, d.cfg.NodeName)
		if err == nil {
			err = grant.Write(d.cfg.GrantDir, g.podUID, string(c.UID), g.grant)
		}
		if err != nil {
			d.cfg.Logger.Warn("DRA: prepare refused", "claim", c.Namespace+"/"+c.Name, "err", err)
			out[c.UID] = kubeletplugin.PrepareResult{Err: err}
			continue
		}
		d.cfg.Logger.Info("DRA: claim prepared", "claim", g.grant.Claim, "pod", g.podUID,
			"ingressBits", g.grant.IngressBits, "egressBits", g.grant.EgressBits)
		out[c.UID] = kubeletplugin.PrepareResult{Devices: g.devices}
	}
	return out, nil
}

// UnprepareResourceClaims releases the claims' grants (their pods have
// stopped).
func (d *Driver) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	out := make(map[types.UID]error, len(claims))
	for _, c := range claims {
		n, err := grant.RemoveClaim(d.cfg.GrantDir, string(c.UID))
		out[c.UID] = err
		if err == nil {
			d.cfg.Logger.Info("DRA: claim unprepared", "claim", c.Namespace+"/"+c.Name, "grants", n)
		}
	}
	return out, nil
}

// HandleError logs the helper's background errors. Publishing errors are
// retried by the helper; a refused slice says so in the log.
func (d *Driver) HandleError(ctx context.Context, err error, msg string) {
	var dropped *resourceslice.DroppedFieldsError
	if errors.As(err, &dropped) {
		d.cfg.Logger.Error("DRA: the API server dropped fields of the node's ResourceSlice: consumable capacity (feature gate DRAConsumableCapacity) is off", "err", err)
		return
	}
	d.cfg.Logger.Error("DRA: "+msg, "err", err, "recoverable", errors.Is(err, kubeletplugin.ErrRecoverable))
}

// WatchHealthStatus: a bandwidth device has no health of its own to
// report.
func (d *Driver) WatchHealthStatus(context.Context, chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}

// Run starts the driver and keeps it until ctx ends, then stops it. A
// start that fails for a reason that may pass (the API server or the
// kubelet's directory not there yet) is retried every retry; a cluster
// without DRA ends it at once. It returns when the driver is stopped.
func Run(ctx context.Context, cfg Config, retry time.Duration) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	for {
		d, err := Start(ctx, cfg)
		switch {
		case err == nil:
			<-ctx.Done()
			d.Stop()
			return
		case errors.Is(err, ErrNoAPI):
			log.Warn("no DRA driver: pods cannot claim bandwidth through the scheduler", "err", err)
			return
		}
		log.Error("DRA driver not started; retrying", "err", err, "in", retry)
		select {
		case <-ctx.Done():
			return
		case <-time.After(retry):
		}
	}
}
