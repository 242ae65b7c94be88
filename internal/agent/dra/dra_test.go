package dra

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	fakediscovery "k8s.io/client-go/discovery/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"

	"github.com/qoscni/qoscni/internal/grant"
	"github.com/qoscni/qoscni/shaping"
)

func q(s string) resource.Quantity { return resource.MustParse(s) }

func TestDevicesPolicy(t *testing.T) {
	devs := Devices(shaping.Capacity{EgressBits: 1e9, IngressBits: 950e6 + 500e3}, 0, DefaultPolicy)
	if len(devs) != 2 || devs[0].Name != Egress || devs[1].Name != Ingress {
		t.Fatalf("devices: %+v", devs)
	}
	for _, d := range devs {
		if d.AllowMultipleAllocations == nil || !*d.AllowMultipleAllocations {
			t.Errorf("%s: not shareable", d.Name)
		}
		if v := d.Attributes[DirectionAttribute].StringValue; v == nil || *v != d.Name {
			t.Errorf("%s: direction attribute %v", d.Name, v)
		}
	}
	eg := devs[0].Capacity[CapacityName]
	in := devs[1].Capacity[CapacityName]
	if eg.Value.Cmp(q("1G")) != 0 || in.Value.Cmp(q("950500k")) != 0 {
		t.Fatalf("capacities %s %s", eg.Value.String(), in.Value.String())
	}
	// The largest valid amount is the capacity rounded down to a step
	// from the minimum, and the API server's rules hold.
	for _, c := range []struct {
		dc      resourceapi.DeviceCapacity
		wantMax string
	}{{eg, "1G"}, {in, "950M"}} {
		checkPolicy(t, c.dc, c.wantMax, "10M")
	}

	// The network's maxRequest and the flag's maximum bound it; a
	// default above the top comes down to it.
	devs = Devices(shaping.Capacity{EgressBits: 1e9}, 400e6, Policy{DefaultBits: 500e6, MinBits: 0, StepBits: 100e6})
	if len(devs) != 1 {
		t.Fatalf("one direction: %+v", devs)
	}
	checkPolicy(t, devs[0].Capacity[CapacityName], "400M", "400M")
	devs = Devices(shaping.Capacity{EgressBits: 1e9}, 0, Policy{DefaultBits: 1e6, MinBits: 1e6, StepBits: 1e6, MaxBits: 250e6 + 1})
	checkPolicy(t, devs[0].Capacity[CapacityName], "250M", "1M")

	// A capacity below one step: no policy, a claim takes all of it.
	devs = Devices(shaping.Capacity{EgressBits: 1500e3}, 0, DefaultPolicy)
	if devs[0].Capacity[CapacityName].RequestPolicy != nil {
		t.Errorf("a 1.5M device got a policy: %+v", devs[0].Capacity[CapacityName].RequestPolicy)
	}
	if Devices(shaping.Capacity{}, 0, DefaultPolicy) != nil {
		t.Error("no capacity: devices published")
	}
}

// checkPolicy checks a device capacity's policy as the API server's
// validation does (min+k*step for max and default, min+step within the
// capacity) and its values.
func checkPolicy(t *testing.T, dc resourceapi.DeviceCapacity, wantMax, wantDefault string) {
	t.Helper()
	p := dc.RequestPolicy
	if p == nil || p.Default == nil || p.ValidRange == nil || p.ValidRange.Min == nil || p.ValidRange.Max == nil || p.ValidRange.Step == nil {
		t.Fatalf("incomplete policy %+v", p)
	}
	r := p.ValidRange
	minV, maxV, step, def := r.Min.Value(), r.Max.Value(), r.Step.Value(), p.Default.Value()
	if r.Max.Cmp(q(wantMax)) != 0 || p.Default.Cmp(q(wantDefault)) != 0 {
		t.Errorf("max %s default %s, want %s %s", r.Max.String(), p.Default.String(), wantMax, wantDefault)
	}
	if maxV > dc.Value.Value() || minV+step > dc.Value.Value() || def < minV || def > maxV ||
		(maxV-minV)%step != 0 || (def-minV)%step != 0 {
		t.Errorf("policy the API server refuses: cap %s %+v", dc.Value.String(), r)
	}
}

func TestPolicyCheck(t *testing.T) {
	for _, p := range []Policy{
		{DefaultBits: 1, MinBits: 1, StepBits: 0},
		{DefaultBits: 1, MinBits: 2, StepBits: 1},
		{DefaultBits: 15e5, MinBits: 1e6, StepBits: 1e6},
		{DefaultBits: 10e6, MinBits: 1e6, StepBits: 1e6, MaxBits: 5e6},
	} {
		if p.Check() == nil {
			t.Errorf("%+v accepted", p)
		}
	}
	if err := DefaultPolicy.Check(); err != nil {
		t.Error(err)
	}
}

const (
	node   = "node-a"
	podUID = "5d0f3c2a-8b1e-4f6a-9c7d-2e4b6a8c0d1e"
)

func claim(uid string, results []resourceapi.DeviceRequestAllocationResult, pods ...string) *resourceapi.ResourceClaim {
	c := &resourceapi.ResourceClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "team", Name: "web-bw-" + uid, UID: types.UID(uid)}}
	c.Status.Allocation = &resourceapi.AllocationResult{Devices: resourceapi.DeviceAllocationResult{Results: results}}
	for _, p := range pods {
		c.Status.ReservedFor = append(c.Status.ReservedFor, resourceapi.ResourceClaimConsumerReference{Resource: "pods", Name: "web", UID: types.UID(p)})
	}
	return c
}

func result(req, dev, amount string) resourceapi.DeviceRequestAllocationResult {
	share := types.UID("share-" + req)
	return resourceapi.DeviceRequestAllocationResult{Request: req, Driver: DefaultDriverName, Pool: node, Device: dev, ShareID: &share,
		ConsumedCapacity: map[resourceapi.QualifiedName]resource.Quantity{CapacityName: q(amount)}}
}

func testDriver(t *testing.T) *Driver {
	return &Driver{cfg: Config{DriverName: DefaultDriverName, NodeName: node, GrantDir: t.TempDir(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}}
}

func TestPrepareWritesGrantsUnprepareRemoves(t *testing.T) {
	d := testDriver(t)
	both := claim("c1", []resourceapi.DeviceRequestAllocationResult{result("out", Egress, "400M"), result("in", Ingress, "200M")}, podUID)
	// Another driver's device in the same claim is not ours to count.
	other := result("gpu", "gpu-0", "1")
	other.Driver = "gpu.example.com"
	both.Status.Allocation.Devices.Results = append(both.Status.Allocation.Devices.Results, other)
	more := claim("c2", []resourceapi.DeviceRequestAllocationResult{result("out", Egress, "50M")}, podUID)
	res, err := d.PrepareResourceClaims(context.Background(), []*resourceapi.ResourceClaim{both, more})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []types.UID{"c1", "c2"} {
		if res[c].Err != nil {
			t.Fatalf("%s: %v", c, res[c].Err)
		}
	}
	if devs := res["c1"].Devices; len(devs) != 2 || devs[0].DeviceName != Egress || devs[0].PoolName != node ||
		devs[0].Requests[0] != "out" || devs[0].ShareID == nil || *devs[0].ShareID != "share-out" {
		t.Fatalf("devices told to the kubelet: %+v", devs)
	}
	tot, err := grant.ForPod(d.cfg.GrantDir, podUID)
	if err != nil || tot.EgressBits != 450e6 || tot.IngressBits != 200e6 || len(tot.Claims) != 2 || tot.Claims[0] != "team/web-bw-c1" {
		t.Fatalf("grants: %+v %v", tot, err)
	}
	// Prepared again (a kubelet restart): the same sum.
	if _, err := d.PrepareResourceClaims(context.Background(), []*resourceapi.ResourceClaim{both}); err != nil {
		t.Fatal(err)
	}
	if tot, _ = grant.ForPod(d.cfg.GrantDir, podUID); tot.EgressBits != 450e6 {
		t.Fatalf("after preparing again: %+v", tot)
	}
	un, err := d.UnprepareResourceClaims(context.Background(), []kubeletplugin.NamespacedObject{
		{NamespacedName: types.NamespacedName{Namespace: "team", Name: "web-bw-c1"}, UID: "c1"},
		{NamespacedName: types.NamespacedName{Namespace: "team", Name: "gone"}, UID: "never-prepared"},
	})
	if err != nil || un["c1"] != nil || un["never-prepared"] != nil || len(un) != 2 {
		t.Fatalf("unprepare: %v %v", un, err)
	}
	if tot, _ = grant.ForPod(d.cfg.GrantDir, podUID); tot.EgressBits != 50e6 || tot.IngressBits != 0 {
		t.Fatalf("after unprepare of c1: %+v", tot)
	}
}

func TestPrepareRefuses(t *testing.T) {
	noCap := result("out", Egress, "1")
	noCap.ConsumedCapacity = nil
	foreignPool := result("out", Egress, "1M")
	foreignPool.Pool = "node-b"
	for _, c := range []struct {
		claim *resourceapi.ResourceClaim
		want  string
	}{
		{claim("shared", []resourceapi.DeviceRequestAllocationResult{result("out", Egress, "1M")}, podUID, "6e1a4d3b-9c2f-4a7b-8d0e-3f5c7b9d1e2f"),
			"shared by 2 pods"},
		{claim("nopod", []resourceapi.DeviceRequestAllocationResult{result("out", Egress, "1M")}), "reserved for no pod"},
		{claim("nocap", []resourceapi.DeviceRequestAllocationResult{noCap}, podUID), "DRAConsumableCapacity"},
		{claim("pool", []resourceapi.DeviceRequestAllocationResult{foreignPool}, podUID), "not this node's"},
		{claim("dev", []resourceapi.DeviceRequestAllocationResult{result("out", "sideways", "1M")}, podUID), `device "sideways"`},
		{claim("frac", []resourceapi.DeviceRequestAllocationResult{result("out", Egress, "1500m")}, podUID), "whole number"},
		{&resourceapi.ResourceClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "team", Name: "x", UID: "unalloc"}}, "not allocated"},
	} {
		d := testDriver(t)
		res, err := d.PrepareResourceClaims(context.Background(), []*resourceapi.ResourceClaim{c.claim})
		if err != nil {
			t.Fatal(err)
		}
		if e := res[c.claim.UID].Err; e == nil || !strings.Contains(e.Error(), c.want) || !strings.Contains(e.Error(), "team/") {
			t.Errorf("%s: %v, want an error naming the claim and %q", c.claim.UID, e, c.want)
		}
		if pods, _ := grant.Pods(d.cfg.GrantDir); len(pods) != 0 {
			t.Errorf("%s: a refused claim left grants %v", c.claim.UID, pods)
		}
	}
}

// TestStartPublishesAndRegisters runs the driver against a fake API
// (ResourceSlices are plain objects there) and a kubelet directory of its
// own: it registers its sockets, publishes the node's devices from the
// CNI config, republishes when the capacity changes, and refuses to start
// where the API has no resource.k8s.io/v1.
func TestStartPublishesAndRegisters(t *testing.T) {
	kubelet := t.TempDir()
	if err := os.MkdirAll(filepath.Join(kubelet, "plugins_registry"), 0o750); err != nil {
		t.Fatal(err)
	}
	confDir := t.TempDir()
	writeConf := func(egress string) {
		t.Helper()
		conf := `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"qoscni","nodeCapacity":{"egress":"` + egress + `"}}]}`
		if egress == "" {
			conf = `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"qoscni"}]}`
		}
		if err := os.WriteFile(filepath.Join(confDir, "10-qoscni.conflist"), []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeConf("1G")
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node, UID: "node-uid"}})
	cfg := Config{NodeName: node, Client: client, KubeletDir: kubelet, GrantDir: t.TempDir(), CNIConfDir: confDir,
		RefreshInterval: 100 * time.Millisecond, Policy: DefaultPolicy, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := Start(ctx, cfg); err == nil || !strings.Contains(err.Error(), "resource.k8s.io/v1") {
		t.Fatalf("started without the API: %v", err)
	}
	client.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{
		{GroupVersion: "resource.k8s.io/v1", APIResources: []metav1.APIResource{{Name: "resourceslices", Kind: "ResourceSlice"}}},
	}
	d, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	for _, sock := range []string{filepath.Join(kubelet, "plugins_registry", DefaultDriverName+"-reg.sock"), filepath.Join(kubelet, "plugins", DefaultDriverName, "dra.sock")} {
		if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("socket %s: %v", sock, err)
		}
	}
	egress := func() (string, error) {
		l, err := client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{})
		if err != nil {
			return "", err
		}
		var out []string
		for _, s := range l.Items {
			if s.Spec.Driver != DefaultDriverName || s.Spec.NodeName == nil || *s.Spec.NodeName != node || s.Spec.Pool.Name != node {
				t.Errorf("slice %s: driver %s node %v pool %s", s.Name, s.Spec.Driver, s.Spec.NodeName, s.Spec.Pool.Name)
			}
			for _, dev := range s.Spec.Devices {
				v := dev.Capacity[CapacityName].Value
				out = append(out, dev.Name+"="+v.String())
			}
		}
		return strings.Join(out, ","), nil
	}
	waitSlice := func(want string) {
		t.Helper()
		var got string
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if got, err = egress(); err == nil && got == want {
				return
			}
		}
		t.Fatalf("slice devices %q (%v), want %q", got, err, want)
	}
	waitSlice("egress=1G")
	writeConf("2G")
	waitSlice("egress=2G")
	// Guarantees turned off: the node offers nothing any more.
	writeConf("")
	waitSlice("")
}

// Run retries a start that may succeed later (here: the kubelet has not
// made its plugin registry yet), gives up at once on a cluster without
// DRA, and unregisters when its context ends.
func TestRunRetries(t *testing.T) {
	kubelet := t.TempDir()
	confDir := t.TempDir()
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}})
	cfg := Config{NodeName: node, Client: client, KubeletDir: kubelet, GrantDir: t.TempDir(), CNIConfDir: confDir,
		Policy: DefaultPolicy, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}

	done := make(chan struct{})
	go func() { Run(context.Background(), cfg, time.Hour); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run kept trying on a cluster without resource.k8s.io/v1")
	}

	client.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{
		{GroupVersion: "resource.k8s.io/v1", APIResources: []metav1.APIResource{{Name: "resourceslices", Kind: "ResourceSlice"}}},
	}
	ctx, cancel := context.WithCancel(context.Background())
	done = make(chan struct{})
	go func() { Run(ctx, cfg, 50*time.Millisecond); close(done) }()
	time.Sleep(200 * time.Millisecond)
	reg := filepath.Join(kubelet, "plugins_registry")
	sock := filepath.Join(reg, DefaultDriverName+"-reg.sock")
	if _, err := os.Stat(sock); err == nil {
		t.Fatal("registered without a plugin registry")
	}
	if err := os.MkdirAll(reg, 0o750); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, err := os.Stat(sock); err != nil; _, err = os.Stat(sock) {
		if time.Now().After(deadline) {
			t.Fatalf("not registered after the registry appeared: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}
