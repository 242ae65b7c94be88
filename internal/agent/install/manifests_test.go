package install_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/qoscni/qoscni/internal/agent"
	"github.com/qoscni/qoscni/internal/agent/dra"
	"github.com/qoscni/qoscni/internal/agent/install"
	"github.com/qoscni/qoscni/internal/agent/nodenet"
	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/ipam"
)

// serviceMonitor is the part of the Prometheus Operator's
// monitoring.coreos.com/v1 ServiceMonitor the manifests use (field names as
// in prometheus-operator's pkg/apis/monitoring/v1), so strict decoding
// catches a misspelt field.
type serviceMonitor struct {
	APIVersion string             `json:"apiVersion"`
	Kind       string             `json:"kind"`
	Metadata   metav1ObjectMeta   `json:"metadata"`
	Spec       serviceMonitorSpec `json:"spec"`
}

type metav1ObjectMeta struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
}

type serviceMonitorSpec struct {
	JobLabel string `json:"jobLabel"`
	Selector struct {
		MatchLabels map[string]string `json:"matchLabels"`
	} `json:"selector"`
	Endpoints []struct {
		Port          string `json:"port"`
		Path          string `json:"path"`
		Interval      string `json:"interval"`
		ScrapeTimeout string `json:"scrapeTimeout"`
		Relabelings   []struct {
			SourceLabels []string `json:"sourceLabels"`
			TargetLabel  string   `json:"targetLabel"`
		} `json:"relabelings"`
	} `json:"endpoints"`
}

// rendered is one kustomization's output, decoded strictly by kind.
type rendered struct {
	namespaces   []corev1.Namespace
	accounts     []corev1.ServiceAccount
	roles        []rbacv1.ClusterRole
	bindings     []rbacv1.ClusterRoleBinding
	configMaps   map[string]corev1.ConfigMap // by name without hash suffix
	daemonSets   []appsv1.DaemonSet
	services     []corev1.Service
	monitors     []serviceMonitor
	classes      []resourcev1.DeviceClass
	promRules    []map[string]any // checked against alerts.yml by internal/agent TestAlertRules
	policies     []admissionv1.ValidatingAdmissionPolicy
	vapBindings  []admissionv1.ValidatingAdmissionPolicyBinding
	allResources []string
}

// grow appends a zero T to *s and returns it, to decode into.
func grow[T any](s *[]T) *T {
	var zero T
	*s = append(*s, zero)
	return &(*s)[len(*s)-1]
}

func strict(data []byte, into any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	return dec.Decode(into)
}

// manifest is one rendered object, as JSON.
type manifest struct {
	kind, name string
	json       []byte
}

// kustomize renders dir as kubectl apply -k does.
func kustomize(t *testing.T, dir string) []manifest {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions()) // root-only loading, as kubectl
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize %s: %v", dir, err)
	}
	var out []manifest
	for _, res := range m.Resources() {
		data, err := res.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, manifest{res.GetKind(), res.GetName(), data})
	}
	return out
}

func render(t *testing.T, dir string) *rendered {
	t.Helper()
	return decodeManifests(t, dir, kustomize(t, dir))
}

// decodeManifests decodes each object strictly into its k8s.io/api type.
func decodeManifests(t *testing.T, dir string, ms []manifest) *rendered {
	t.Helper()
	r := &rendered{configMaps: map[string]corev1.ConfigMap{}}
	for _, m := range ms {
		data, kind, name := m.json, m.kind, m.name
		r.allResources = append(r.allResources, kind+"/"+name)
		var into any
		switch kind {
		case "Namespace":
			into = grow(&r.namespaces)
		case "ServiceAccount":
			into = grow(&r.accounts)
		case "ClusterRole":
			into = grow(&r.roles)
		case "ClusterRoleBinding":
			into = grow(&r.bindings)
		case "ConfigMap":
			var cm corev1.ConfigMap
			if err := strict(data, &cm); err != nil {
				t.Fatalf("%s %s: %v", kind, name, err)
			}
			base := name
			if i := strings.LastIndex(name, "-"); i > 0 && name[:i] == "qoscni-config" {
				base = name[:i]
			}
			r.configMaps[base] = cm
			continue
		case "DaemonSet":
			into = grow(&r.daemonSets)
		case "Service":
			into = grow(&r.services)
		case "PrometheusRule":
			var m map[string]any
			if err := json.Unmarshal(data, &m); err != nil {
				t.Fatal(err)
			}
			r.promRules = append(r.promRules, m)
			continue
		case "ValidatingAdmissionPolicy":
			into = grow(&r.policies)
		case "ValidatingAdmissionPolicyBinding":
			into = grow(&r.vapBindings)
		case "DeviceClass":
			into = grow(&r.classes)
		case "ServiceMonitor":
			into = grow(&r.monitors)
		default:
			t.Fatalf("%s: unexpected kind %s/%s", dir, kind, name)
		}
		if err := strict(data, into); err != nil {
			t.Fatalf("%s: %s %s does not decode strictly: %v", dir, kind, name, err)
		}
	}
	return r
}

const deployDir = "../../../deploy"

func TestAgentAndPluginDefaultsAgree(t *testing.T) {
	for _, c := range []struct{ what, got, want string }{
		{"agent.DefaultListen", agent.DefaultListen, install.ListenAddr},
		{"agent.DefaultStateDir", agent.DefaultStateDir, install.StateDir},
		{"agent.DefaultJournalDir", agent.DefaultJournalDir, install.JournalDir},
		{"agent.DefaultCNIConfDir", agent.DefaultCNIConfDir, install.CNIConfDir},
		{"netconf.DefaultStateDir", netconf.DefaultStateDir, install.StateDir},
		{"ipam.DefaultDataDir", ipam.DefaultDataDir, install.IPAMDir},
		{"journal dir beside state dir", path.Join(path.Dir(install.StateDir), "journal"), install.JournalDir},
	} {
		if c.got != c.want {
			t.Errorf("%s = %q, install says %q", c.what, c.got, c.want)
		}
	}
}

// TestPrometheusRuleManifest: deploy/prometheusrule renders one
// PrometheusRule in the agent's namespace, apart from deploy/ (whose apply
// would fail without the Operator's CRDs).
func TestPrometheusRuleManifest(t *testing.T) {
	r := render(t, filepath.Join(deployDir, "prometheusrule"))
	if len(r.promRules) != 1 || len(r.allResources) != 1 {
		t.Fatalf("rendered %v", r.allResources)
	}
	md, _ := r.promRules[0]["metadata"].(map[string]any)
	if md["namespace"] != "qoscni" {
		t.Errorf("PrometheusRule in namespace %v", md["namespace"])
	}
	if base := render(t, deployDir); len(base.promRules) != 0 {
		t.Error("a PrometheusRule in deploy/ itself")
	}
}

func TestManifests(t *testing.T) {
	for _, c := range []struct {
		dir  string
		mode install.Mode
	}{
		{deployDir, install.Standalone},
		{filepath.Join(deployDir, "overlays/standalone"), install.Standalone},
		{filepath.Join(deployDir, "overlays/chained"), install.Chained},
	} {
		t.Run(c.dir, func(t *testing.T) {
			r := render(t, c.dir)
			if len(r.namespaces) != 1 {
				t.Errorf("%d Namespaces rendered, want 1", len(r.namespaces))
			}
			checkManifests(t, r, c.mode)
		})
	}
}

// checkManifests checks one rendering of the manifests: kustomize's, with
// its Namespace, or the chart's, whose namespace Helm makes.
func checkManifests(t *testing.T, r *rendered, mode install.Mode) {
	want := []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Service"}
	for _, k := range want {
		if !slices.ContainsFunc(r.allResources, func(s string) bool { return strings.HasPrefix(s, k+"/") }) {
			t.Errorf("no %s rendered (have %v)", k, r.allResources)
		}
	}
	if len(r.daemonSets) != 1 {
		t.Fatalf("want one DaemonSet, have %d", len(r.daemonSets))
	}
	ds := r.daemonSets[0]
	ns := ds.Namespace
	if len(r.namespaces) != 0 && ds.Namespace != r.namespaces[0].Name {
		t.Errorf("DaemonSet in namespace %q, Namespace is %q", ds.Namespace, r.namespaces[0].Name)
	}

	// RBAC: exactly pods get/list/watch and patch (the effective-shaping
	// annotation), nodes get/list/watch (pod routes)
	// and patch (the agent's VTEP annotation), events create; the DRA
	// driver's ResourceSlices (what the slice controller does) and claims
	// (get, what the kubelet plugin helper does).
	wantRules := map[string][]string{"pods": {"get", "list", "watch", "patch"}, "nodes": {"get", "list", "watch", "patch"}, "events": {"create"},
		"resource.k8s.io/resourceslices": {"get", "list", "watch", "create", "update", "delete"}, "resource.k8s.io/resourceclaims": {"get"},
		// NetworkPolicy: every pod's peers are any pod of any namespace.
		"namespaces": {"list", "watch"}, "networking.k8s.io/networkpolicies": {"list", "watch"}}
	gotRules := map[string][]string{}
	for _, rule := range r.roles[0].Rules {
		if len(rule.APIGroups) != 1 || len(rule.ResourceNames) > 0 || len(rule.NonResourceURLs) > 0 {
			t.Errorf("unexpected rule %+v", rule)
			continue
		}
		for _, res := range rule.Resources {
			if g := rule.APIGroups[0]; g != "" {
				res = g + "/" + res
			}
			gotRules[res] = append(gotRules[res], rule.Verbs...)
		}
	}
	checkDeviceClasses(t, r.classes)
	// The annotation guardrail (test/e2e/admission runs it in an API
	// server): cluster-scoped, bound, denying.
	if len(r.policies) != 1 || len(r.vapBindings) != 1 || r.policies[0].Namespace != "" ||
		r.vapBindings[0].Spec.PolicyName != r.policies[0].Name || !slices.Equal(r.vapBindings[0].Spec.ValidationActions, []admissionv1.ValidationAction{admissionv1.Deny}) {
		t.Errorf("admission policy %d, bindings %d: want one bound Deny policy", len(r.policies), len(r.vapBindings))
	}
	if fmt.Sprint(gotRules) != fmt.Sprint(wantRules) {
		t.Errorf("ClusterRole rules %v, want %v", gotRules, wantRules)
	}
	b := r.bindings[0]
	if b.RoleRef.Name != r.roles[0].Name || len(b.Subjects) != 1 || b.Subjects[0].Name != r.accounts[0].Name || b.Subjects[0].Namespace != ns {
		t.Errorf("binding %+v does not bind the role to the service account", b)
	}
	spec := ds.Spec.Template.Spec
	if spec.ServiceAccountName != r.accounts[0].Name {
		t.Errorf("DaemonSet service account %q", spec.ServiceAccountName)
	}

	// Network config.
	cm, ok := r.configMaps["qoscni-config"]
	if !ok {
		t.Fatalf("no qoscni-config ConfigMap: %v", r.allResources)
	}
	if got := cm.Data["mode"]; got != string(mode) {
		t.Errorf("mode %q, want %q", got, mode)
	}
	if _, ok := cm.Data["primary"]; !ok {
		t.Error("no primary key: $(QOSCNI_PRIMARY) would stay unexpanded")
	}
	if cm.Data["standalone.json"] != string(install.DefaultStandaloneConflist) {
		t.Error("deploy/base/config/standalone.json differs from install.DefaultStandaloneConflist")
	}
	if cm.Data["chained.json"] != string(install.DefaultChainedPlugin) {
		t.Error("deploy/base/config/chained.json differs from install.DefaultChainedPlugin")
	}

	// Grafana dashboard for the sidecar.
	dash, ok := r.configMaps["qoscni-grafana-dashboard"]
	if !ok {
		t.Fatal("no dashboard ConfigMap")
	}
	if dash.Labels["grafana_dashboard"] != "1" {
		t.Errorf("dashboard labels %v: the Grafana sidecar looks for grafana_dashboard=1", dash.Labels)
	}
	file, err := os.ReadFile(filepath.Join(deployDir, "grafana/qoscni.json"))
	if err != nil {
		t.Fatal(err)
	}
	if dash.Data["qoscni.json"] != string(file) {
		t.Error("dashboard ConfigMap differs from deploy/grafana/qoscni.json")
	}

	checkDaemonSet(t, ds, cm.Name, mode)
	// A key the ConfigMap lacks would keep the pod from starting.
	for _, c := range append(ds.Spec.Template.Spec.InitContainers, ds.Spec.Template.Spec.Containers...) {
		for _, e := range c.Env {
			if ref := e.ValueFrom; ref != nil && ref.ConfigMapKeyRef != nil {
				if _, ok := cm.Data[ref.ConfigMapKeyRef.Key]; !ok {
					t.Errorf("container %s: %s from key %q, which ConfigMap %s lacks", c.Name, e.Name, ref.ConfigMapKeyRef.Key, cm.Name)
				}
			}
		}
	}
	// Pod routes to other nodes: the standalone CNI's job, never the
	// chained one's (the primary routes).
	routes := ""
	for _, c := range ds.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			if c.Name == "agent" && e.Name == nodenet.ModeEnv {
				routes = e.Value
			}
		}
	}
	if want := map[install.Mode]string{install.Standalone: "auto", install.Chained: ""}[mode]; routes != want {
		t.Errorf("agent %s=%q in %s mode, want %q", nodenet.ModeEnv, routes, mode, want)
	}

	// Service and ServiceMonitor reach the agent's metrics.
	svc := r.services[0]
	podLabels := ds.Spec.Template.Labels
	for k, v := range svc.Spec.Selector {
		if podLabels[k] != v {
			t.Errorf("Service selector %v does not select the agent pods %v", svc.Spec.Selector, podLabels)
		}
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != install.ListenPort || svc.Spec.Ports[0].TargetPort.String() != "metrics" {
		t.Errorf("Service ports %+v", svc.Spec.Ports)
	}
	if len(r.monitors) != 0 {
		// Without the Operator's CRDs, kubectl apply -k deploy/ would fail.
		t.Errorf("ServiceMonitor in the base manifests: it belongs in deploy/servicemonitor")
	}
	sm := render(t, filepath.Join(deployDir, "servicemonitor"))
	if len(sm.allResources) != 1 {
		t.Errorf("deploy/servicemonitor renders %v, want one ServiceMonitor", sm.allResources)
	}
	checkServiceMonitor(t, sm, ns, svc)
	// deploy/prometheus/kubernetes.yml keeps pods by this label.
	if podLabels["app.kubernetes.io/name"] != install.AgentBinary {
		t.Errorf("pod label app.kubernetes.io/name=%q, deploy/prometheus expects %q", podLabels["app.kubernetes.io/name"], install.AgentBinary)
	}
	prom, _ := os.ReadFile(filepath.Join(deployDir, "prometheus/kubernetes.yml"))
	if !strings.Contains(string(prom), "$1:"+strconv.Itoa(install.ListenPort)) {
		t.Error("deploy/prometheus/kubernetes.yml scrapes another port")
	}
}

func checkDaemonSet(t *testing.T, ds appsv1.DaemonSet, configMap string, mode install.Mode) {
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("not hostNetwork")
	}
	if !slices.ContainsFunc(spec.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Key == "" && tol.Operator == corev1.TolerationOpExists && tol.Effect == ""
	}) {
		t.Errorf("tolerations %+v do not tolerate every taint", spec.Tolerations)
	}
	// Host paths by volume name.
	hostPath := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPath[v.Name] = v.HostPath.Path
		}
		if v.ConfigMap != nil && v.ConfigMap.Name != configMap {
			t.Errorf("volume %s uses ConfigMap %s, not %s", v.Name, v.ConfigMap.Name, configMap)
		}
	}
	for _, p := range []string{install.CNIBinDir, install.CNIConfDir, install.DataDir, install.NetnsDir} {
		if !slices.Contains(slices.Collect(mapValues(hostPath)), p) {
			t.Errorf("no hostPath volume for %s (have %v)", p, hostPath)
		}
	}
	// mountedAt: where the container sees host path p (with its prefix).
	mountedAt := func(c corev1.Container, p string) (string, *corev1.VolumeMount) {
		for i, m := range c.VolumeMounts {
			hp, ok := hostPath[m.Name]
			if !ok {
				continue
			}
			if p == hp || strings.HasPrefix(p, hp+"/") {
				return m.MountPath + strings.TrimPrefix(p, hp), &c.VolumeMounts[i]
			}
		}
		return "", nil
	}
	wantCommand := []string{path.Join(install.ImageBinDir, install.AgentBinary)}
	checkNodeName := func(c corev1.Container) {
		for _, e := range c.Env {
			if e.Name == install.NodeNameEnv && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
				return
			}
		}
		t.Errorf("container %s: no %s from spec.nodeName", c.Name, install.NodeNameEnv)
	}
	checkLimits := func(c corev1.Container) {
		if c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() {
			t.Errorf("container %s: requests/limits %+v", c.Name, c.Resources)
		}
		if sc := c.SecurityContext; sc == nil || (sc.Privileged != nil && *sc.Privileged) || sc.Capabilities == nil ||
			!slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("container %s: security context must drop ALL and not be privileged", c.Name)
		}
	}

	// The install init container: host under --root, config from the ConfigMap.
	if len(spec.InitContainers) != 1 {
		t.Fatalf("want one init container, have %d", len(spec.InitContainers))
	}
	ic := spec.InitContainers[0]
	if !slices.Equal(ic.Command, wantCommand) || len(ic.Args) == 0 || ic.Args[0] != "install" {
		t.Errorf("install container runs %v %v", ic.Command, ic.Args)
	}
	if !slices.Contains(ic.Args, "--root="+install.ContainerHostRoot) {
		t.Errorf("install args %v lack --root=%s", ic.Args, install.ContainerHostRoot)
	}
	for _, p := range []string{install.CNIBinDir, install.CNIConfDir} {
		got, m := mountedAt(ic, p)
		if got != path.Join(install.ContainerHostRoot, p) || m.ReadOnly {
			t.Errorf("install container sees %s at %q (read-only %v), install writes %s", p, got, m != nil && m.ReadOnly, path.Join(install.ContainerHostRoot, p))
		}
	}
	if !slices.ContainsFunc(ic.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.MountPath == install.ContainerConfigDir && m.Name == "config"
	}) || !slices.Contains(ic.Args, "--config="+install.ContainerConfigDir+"/$(QOSCNI_MODE).json") {
		t.Errorf("install container: config not read from the ConfigMap at %s: %v", install.ContainerConfigDir, ic.Args)
	}
	for _, e := range []string{"QOSCNI_MODE", "QOSCNI_PRIMARY", install.NodeCapacityEnv, install.CeilingsEnv} {
		if !slices.ContainsFunc(ic.Env, func(v corev1.EnvVar) bool {
			return v.Name == e && v.ValueFrom != nil && v.ValueFrom.ConfigMapKeyRef != nil && v.ValueFrom.ConfigMapKeyRef.Name == configMap
		}) {
			t.Errorf("install container: %s not from ConfigMap %s", e, configMap)
		}
	}
	checkNodeName(ic)
	checkLimits(ic)
	// br_netfilter (standalone only): the node's modules read only, its
	// /proc/sys/net writable where install looks for them, and SYS_MODULE
	// as the one capability; chained mode gets neither.
	var added []corev1.Capability
	if ic.SecurityContext != nil && ic.SecurityContext.Capabilities != nil {
		added = ic.SecurityContext.Capabilities.Add
	}
	modules, mm := mountedAt(ic, install.ModulesDir)
	procNet, pm := mountedAt(ic, install.ProcSysNetDir)
	if mode == install.Standalone {
		if !slices.Equal(added, []corev1.Capability{"SYS_MODULE"}) {
			t.Errorf("install container capabilities %v, want exactly SYS_MODULE added (finit_module)", added)
		}
		if modules != path.Join(install.ContainerHostRoot, install.ModulesDir) || !mm.ReadOnly {
			t.Errorf("install container sees %s at %q (read-only %v), install reads %s read only", install.ModulesDir, modules, mm != nil && mm.ReadOnly,
				path.Join(install.ContainerHostRoot, install.ModulesDir))
		}
		if procNet != path.Join(install.ContainerHostRoot, install.ProcSysNetDir) || pm.ReadOnly {
			t.Errorf("install container sees %s at %q (read-only %v), install writes %s", install.ProcSysNetDir, procNet, pm != nil && pm.ReadOnly,
				path.Join(install.ContainerHostRoot, install.ProcSysNetDir))
		}
		for _, v := range spec.Volumes {
			// A node without modules (all built in) may have no
			// /lib/modules; the pod must start there as well.
			if v.HostPath != nil && v.HostPath.Path == install.ModulesDir && v.HostPath.Type != nil && *v.HostPath.Type == corev1.HostPathDirectory {
				t.Errorf("volume %s: type Directory keeps the pod from starting on a node without %s", v.Name, install.ModulesDir)
			}
		}
	} else if len(added) > 0 || mm != nil || pm != nil {
		t.Errorf("chained install container: capabilities %v, %s at %q, %s at %q: br_netfilter is the primary CNI's", added,
			install.ModulesDir, modules, install.ProcSysNetDir, procNet)
	}

	// The agent: its default paths at the same place, its port and probes.
	if len(spec.Containers) != 1 {
		t.Fatalf("want one container, have %d", len(spec.Containers))
	}
	c := spec.Containers[0]
	if !slices.Equal(c.Command, wantCommand) {
		t.Errorf("agent command %v", c.Command)
	}
	for _, p := range []string{agent.DefaultStateDir, agent.DefaultJournalDir, install.IPAMDir, agent.DefaultCNIConfDir, install.NetnsDir} {
		got, m := mountedAt(c, p)
		if got != p {
			t.Errorf("agent sees host %s at %q", p, got)
			continue
		}
		if p == install.NetnsDir && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer) {
			t.Errorf("%s mounted without HostToContainer propagation", p)
		}
		if strings.HasPrefix(p, install.DataDir) && m.ReadOnly {
			t.Errorf("agent cannot write %s", p)
		}
	}
	// The DRA driver's kubelet directories, writable, at the host's paths
	// (a kubelet plugin's socket paths are the same inside and out).
	for _, p := range []string{path.Join(dra.DefaultKubeletDir, "plugins_registry"), path.Join(dra.DefaultKubeletDir, "plugins", dra.DefaultDriverName)} {
		if got, m := mountedAt(c, p); got != p || m.ReadOnly {
			t.Errorf("agent sees host %s at %q (read-only %v)", p, got, m != nil && m.ReadOnly)
		}
	}
	if len(c.Ports) != 1 || c.Ports[0].ContainerPort != install.ListenPort || c.Ports[0].HostPort != install.ListenPort {
		t.Errorf("agent ports %+v, want %d", c.Ports, install.ListenPort)
	}
	for _, e := range c.Env {
		if e.Name == agent.ListenEnv {
			t.Errorf("%s set in the DaemonSet: the port would have two sources", e.Name)
		}
	}
	probe := func(name string, p *corev1.Probe, wantPath string) {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("no %s probe", name)
			return
		}
		port := p.HTTPGet.Port.IntValue()
		if p.HTTPGet.Port.String() == c.Ports[0].Name {
			port = int(c.Ports[0].ContainerPort)
		}
		if p.HTTPGet.Path != wantPath || port != install.ListenPort {
			t.Errorf("%s probe %s:%s, want %s:%d", name, p.HTTPGet.Path, p.HTTPGet.Port.String(), wantPath, install.ListenPort)
		}
	}
	probe("liveness", c.LivenessProbe, install.HealthzPath)
	probe("readiness", c.ReadinessProbe, install.ReadyzPath)
	checkNodeName(c)
	checkLimits(c)
	if sc := c.SecurityContext; sc == nil || !slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN"}) {
		t.Errorf("agent capabilities: want exactly NET_ADMIN added")
	}
}

func mapValues(m map[string]string) func(func(string) bool) {
	return func(yield func(string) bool) {
		for _, v := range m {
			if !yield(v) {
				return
			}
		}
	}
}

// The uninstall DaemonSet runs the same binary on every node.
func TestUninstallManifests(t *testing.T) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), filepath.Join(deployDir, "uninstall"))
	if err != nil {
		t.Fatal(err)
	}
	var ds *appsv1.DaemonSet
	for _, res := range m.Resources() {
		data, _ := res.MarshalJSON()
		switch res.GetKind() {
		case "DaemonSet":
			ds = &appsv1.DaemonSet{}
			if err := strict(data, ds); err != nil {
				t.Fatal(err)
			}
		case "Namespace":
			if err := strict(data, &corev1.Namespace{}); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("unexpected %s", res.GetKind())
		}
	}
	if ds == nil {
		t.Fatal("no DaemonSet")
	}
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	if !spec.HostNetwork || c.Args[0] != "uninstall" || !slices.Contains(c.Args, "--root="+install.ContainerHostRoot) {
		t.Fatalf("uninstall DaemonSet: hostNetwork %v args %v", spec.HostNetwork, c.Args)
	}
	hostPath := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPath[v.Name] = v.HostPath.Path
		}
	}
	for _, mnt := range c.VolumeMounts {
		if hp := hostPath[mnt.Name]; hp == "" || mnt.MountPath != path.Join(install.ContainerHostRoot, hp) {
			t.Errorf("mount %s at %s: want host path under %s", mnt.Name, mnt.MountPath, install.ContainerHostRoot)
		}
	}
	for _, p := range []string{install.CNIBinDir, install.CNIConfDir, install.DataDir} {
		if !slices.Contains(slices.Collect(mapValues(hostPath)), p) {
			t.Errorf("uninstall DaemonSet does not mount %s", p)
		}
	}
}

// checkServiceMonitor: deploy/servicemonitor selects the base's Service.
func checkServiceMonitor(t *testing.T, r *rendered, ns string, svc corev1.Service) {
	t.Helper()
	if len(r.monitors) != 1 {
		t.Fatalf("rendered %v, want one ServiceMonitor", r.allResources)
	}
	sm := r.monitors[0]
	if sm.APIVersion != "monitoring.coreos.com/v1" || sm.Metadata.Namespace != ns {
		t.Errorf("ServiceMonitor %s in %q", sm.APIVersion, sm.Metadata.Namespace)
	}
	for k, v := range sm.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("ServiceMonitor selector %v does not select the Service %v", sm.Spec.Selector.MatchLabels, svc.Labels)
		}
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name || sm.Spec.Endpoints[0].Path != install.MetricsPath {
		t.Errorf("ServiceMonitor endpoints %+v", sm.Spec.Endpoints)
	}
}

// checkDeviceClasses: one class per direction, cluster-scoped, selecting
// the driver's device of that direction by the names the agent publishes.
func checkDeviceClasses(t *testing.T, classes []resourcev1.DeviceClass) {
	t.Helper()
	got := map[string]string{}
	for _, c := range classes {
		if c.Namespace != "" {
			t.Errorf("DeviceClass %s has namespace %q: it is cluster-scoped", c.Name, c.Namespace)
		}
		if len(c.Spec.Selectors) != 1 || c.Spec.Selectors[0].CEL == nil {
			t.Errorf("DeviceClass %s: selectors %+v", c.Name, c.Spec.Selectors)
			continue
		}
		got[c.Name] = strings.Join(strings.Fields(c.Spec.Selectors[0].CEL.Expression), " ")
	}
	for _, dir := range []string{dra.Egress, dra.Ingress} {
		name := dir + "." + dra.DefaultDriverName
		want := fmt.Sprintf(`device.driver == %q && device.attributes[%q].%s == %q`, dra.DefaultDriverName, dra.DefaultDriverName, dra.DirectionAttribute, dir)
		if got[name] != want {
			t.Errorf("DeviceClass %s selects %q, want %q", name, got[name], want)
		}
	}
	if len(classes) != 2 {
		t.Errorf("%d DeviceClasses, want 2", len(classes))
	}
}
