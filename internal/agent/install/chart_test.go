package install_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/chart/common"
	chartutil "helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/qoscni/qoscni/internal/agent/install"
	"github.com/qoscni/qoscni/internal/agent/nodenet"
)

const chartDir = "../../../deploy/helm/qoscni"

// helmLabels are the labels the chart adds to kustomize's, Helm's own
// bookkeeping.
var helmLabels = []string{"app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "helm.sh/chart"}

// helmTemplate renders the chart as helm install does (values checked
// against values.schema.json), in namespace qoscni, as objects.
func helmTemplate(t *testing.T, values map[string]any) ([]manifest, error) {
	t.Helper()
	// The loader logs every link in files/ at level Info.
	slog.SetLogLoggerLevel(slog.LevelWarn)
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load the chart: %v", err)
	}
	vals, err := chartutil.ToRenderValues(ch, values, common.ReleaseOptions{Name: "qoscni", Namespace: "qoscni", IsInstall: true}, common.DefaultCapabilities)
	if err != nil {
		return nil, err
	}
	files, err := engine.Render(ch, vals)
	if err != nil {
		return nil, err
	}
	var out []manifest
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if !strings.HasSuffix(name, ".yaml") {
			continue // NOTES.txt, _helpers.tpl
		}
		dec := k8syaml.NewYAMLOrJSONDecoder(strings.NewReader(files[name]), 4096)
		for {
			var o map[string]any
			if err := dec.Decode(&o); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v\n%s", name, err, files[name])
			}
			if o == nil {
				continue
			}
			data, err := json.Marshal(o)
			if err != nil {
				t.Fatal(err)
			}
			md, _ := o["metadata"].(map[string]any)
			name, _ := md["name"].(string)
			kind, _ := o["kind"].(string)
			out = append(out, manifest{kind, name, data})
		}
	}
	return out, nil
}

func mustHelmTemplate(t *testing.T, values map[string]any) []manifest {
	t.Helper()
	ms, err := helmTemplate(t, values)
	if err != nil {
		t.Fatalf("render the chart with %v: %v", values, err)
	}
	return ms
}

// TestChart: the chart's objects pass the checks kustomize's pass, in both
// modes, and decode strictly into their k8s.io/api types.
func TestChart(t *testing.T) {
	for _, mode := range []install.Mode{install.Standalone, install.Chained} {
		t.Run(string(mode), func(t *testing.T) {
			r := decodeManifests(t, "chart", mustHelmTemplate(t, map[string]any{"mode": string(mode)}))
			if len(r.namespaces) != 0 {
				t.Error("the chart renders a Namespace: helm install -n qoscni --create-namespace makes it")
			}
			checkManifests(t, r, mode)
		})
	}
	t.Run("monitoring", func(t *testing.T) {
		r := decodeManifests(t, "chart", mustHelmTemplate(t, map[string]any{
			"serviceMonitor": map[string]any{"enabled": true, "labels": map[string]any{"release": "kps"}},
			"prometheusRule": map[string]any{"enabled": true, "labels": map[string]any{"release": "kps"}},
		}))
		if len(r.monitors) != 1 || len(r.promRules) != 1 || r.monitors[0].Metadata.Labels["release"] != "kps" {
			t.Fatalf("ServiceMonitor %+v, PrometheusRules %d", r.monitors, len(r.promRules))
		}
		checkServiceMonitor(t, r, "qoscni", r.services[0])
		md, _ := r.promRules[0]["metadata"].(map[string]any)
		if labels, _ := md["labels"].(map[string]any); md["namespace"] != "qoscni" || labels["release"] != "kps" {
			t.Errorf("PrometheusRule metadata %v", md)
		}
	})
	// Standalone without br_netfilter: the install skips the kernel and gets
	// neither SYS_MODULE nor the node's modules; no pod routes, no env.
	t.Run("standalone-bare", func(t *testing.T) {
		r := decodeManifests(t, "chart", mustHelmTemplate(t, map[string]any{"bridgeNetfilter": false, "podRoutes": "off", "dra": map[string]any{"enabled": false},
			"admissionPolicy": map[string]any{"enabled": false}, "dashboard": map[string]any{"enabled": false}}))
		spec := r.daemonSets[0].Spec.Template.Spec
		ic := spec.InitContainers[0]
		if !slices.Contains(ic.Args, "--skip-kernel") || len(ic.SecurityContext.Capabilities.Add) != 0 || len(ic.VolumeMounts) != 3 {
			t.Errorf("install container %v, capabilities %v, mounts %v", ic.Args, ic.SecurityContext.Capabilities.Add, ic.VolumeMounts)
		}
		for _, e := range spec.Containers[0].Env {
			if e.Name == nodenet.ModeEnv {
				t.Errorf("agent has %s=%q with podRoutes off", e.Name, e.Value)
			}
		}
		if len(r.classes)+len(r.policies)+len(r.vapBindings) != 0 {
			t.Errorf("disabled objects rendered: %v", r.allResources)
		}
		if _, ok := r.configMaps["qoscni-grafana-dashboard"]; ok {
			t.Error("dashboard rendered with dashboard.enabled=false")
		}
	})
	t.Run("settings", func(t *testing.T) {
		r := decodeManifests(t, "chart", mustHelmTemplate(t, map[string]any{"mode": "chained", "primary": "10-calico.conflist", "nodeCapacity": "auto",
			"ceilings": map[string]any{"maxBurst": 8388608, "maxRequest": "2G"}, "image": map[string]any{"repository": "example.org/qoscni", "tag": "v1"}}))
		cm := r.configMaps["qoscni-config"]
		want := map[string]string{"mode": "chained", "primary": "10-calico.conflist", "nodeCapacity": "auto", "ceilings": "maxBurst=8388608,maxRequest=2G"}
		for k, v := range want {
			if cm.Data[k] != v {
				t.Errorf("ConfigMap %s=%q, want %q", k, cm.Data[k], v)
			}
		}
		if _, err := install.ParseCeilings(cm.Data["ceilings"]); err != nil {
			t.Errorf("install refuses the chart's ceilings: %v", err)
		}
		for _, c := range []struct {
			np   any
			want string
		}{
			{map[string]any{"enabled": true}, install.PolicyK8s},
			{map[string]any{"enabled": false}, install.PolicyOff},
		} {
			r := decodeManifests(t, "chart", mustHelmTemplate(t, map[string]any{"networkPolicy": c.np}))
			if got := r.configMaps["qoscni-config"].Data["networkPolicy"]; got != c.want {
				t.Errorf("networkPolicy %v: ConfigMap networkPolicy=%q, want %q", c.np, got, c.want)
			} else if _, err := install.ParseNetworkPolicy(got); err != nil {
				t.Errorf("install refuses the chart's networkPolicy: %v", err)
			}
		}
		for _, c := range append(r.daemonSets[0].Spec.Template.Spec.InitContainers, r.daemonSets[0].Spec.Template.Spec.Containers...) {
			if c.Image != "example.org/qoscni:v1" {
				t.Errorf("container %s image %q", c.Name, c.Image)
			}
		}
		// A new setting is a new ConfigMap name, so the DaemonSet rolls.
		if def := decodeManifests(t, "chart", mustHelmTemplate(t, nil)).configMaps["qoscni-config"]; def.Name == cm.Name {
			t.Errorf("ConfigMap name %s did not change with its content", cm.Name)
		}
	})
}

// TestChartLint: helm lint finds nothing above a note (it recommends an
// icon), in both modes.
func TestChartLint(t *testing.T) {
	slog.SetLogLoggerLevel(slog.LevelWarn)
	for _, mode := range []string{"standalone", "chained"} {
		l := lint.RunAll(chartDir, map[string]any{"mode": mode}, "qoscni")
		for _, m := range l.Messages {
			if m.Severity >= support.WarningSev {
				t.Errorf("%s: %v", mode, m)
			}
		}
	}
}

// TestChartRefusesBadValues: values.schema.json catches a mistyped value
// before anything reaches the cluster, naming it.
func TestChartRefusesBadValues(t *testing.T) {
	for _, c := range []struct {
		values map[string]any
		says   string
	}{
		{map[string]any{"mode": "bridge"}, "mode"},
		{map[string]any{"ceilings": map[string]any{"maxBurst": "8M"}}, "maxBurst"},
		{map[string]any{"ceilings": map[string]any{"maxQueue": 1}}, "maxQueue"},
		{map[string]any{"nodeCapacity": "10 gigabit"}, "nodeCapacity"},
		{map[string]any{"podRoutes": "bgp"}, "podRoutes"},
		{map[string]any{"networkPolicy": map[string]any{"enabled": "no"}}, "enabled"},
		{map[string]any{"servicemonitor": map[string]any{"enabled": true}}, "servicemonitor"},
	} {
		if _, err := helmTemplate(t, c.values); err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("%v: %v, want an error naming %s", c.values, err, c.says)
		}
	}
}

// canonical is an object as comparable JSON, without Helm's labels.
func canonical(t *testing.T, m manifest) string {
	t.Helper()
	var o map[string]any
	if err := json.Unmarshal(m.json, &o); err != nil {
		t.Fatal(err)
	}
	if md, _ := o["metadata"].(map[string]any); md != nil {
		if labels, _ := md["labels"].(map[string]any); labels != nil {
			for _, l := range helmLabels {
				delete(labels, l)
			}
		}
	}
	b, err := json.MarshalIndent(o, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestChartMatchesKustomize: for the same settings, helm template and
// kustomize render the same objects (the Namespace aside, which Helm
// makes, and Helm's own labels), the ConfigMap's hashed name included.
func TestChartMatchesKustomize(t *testing.T) {
	abs, err := filepath.Abs(deployDir)
	if err != nil {
		t.Fatal(err)
	}
	// overlay is a kustomization on top of deploy/overlays/<base> that
	// merges literals into the ConfigMap, as a user would.
	overlay := func(base string, literals ...string) string {
		dir := t.TempDir()
		rel, err := filepath.Rel(dir, filepath.Join(abs, "overlays", base)) // kustomize takes no absolute root
		if err != nil {
			t.Fatal(err)
		}
		k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\n", rel)
		k += "configMapGenerator:\n  - name: qoscni-config\n    namespace: qoscni\n    behavior: merge\n    literals:\n"
		for _, l := range literals {
			k += "      - " + l + "\n"
		}
		if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	for _, c := range []struct {
		name   string
		values map[string]any
		dirs   func() []string
	}{
		{"deploy", nil, func() []string { return []string{deployDir} }},
		{"chained", map[string]any{"mode": "chained"}, func() []string { return []string{filepath.Join(deployDir, "overlays/chained")} }},
		{"chained-settings", map[string]any{"mode": "chained", "primary": "10-calico.conflist", "nodeCapacity": "ingress=10G,egress=5G",
			"ceilings": map[string]any{"maxRequest": "2G", "maxQueueDelay": "50ms", "maxBurst": 8388608}},
			func() []string {
				return []string{overlay("chained", "primary=10-calico.conflist", "nodeCapacity=ingress=10G,egress=5G",
					"ceilings=maxBurst=8388608,maxQueueDelay=50ms,maxRequest=2G")}
			}},
		{"standalone-capacity", map[string]any{"nodeCapacity": "auto", "ceilings": map[string]any{"maxQueueBytes": 4194304}},
			func() []string {
				return []string{overlay("standalone", "nodeCapacity=auto", "ceilings=maxQueueBytes=4194304")}
			}},
		{"standalone-no-policy", map[string]any{"networkPolicy": map[string]any{"enabled": false}},
			func() []string { return []string{overlay("standalone", "networkPolicy=off")} }},
		{"monitoring", map[string]any{"serviceMonitor": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true}},
			func() []string {
				return []string{deployDir, filepath.Join(deployDir, "servicemonitor"), filepath.Join(deployDir, "prometheusrule")}
			}},
	} {
		t.Run(c.name, func(t *testing.T) {
			kust := map[string]string{}
			for _, dir := range c.dirs() {
				for _, m := range kustomize(t, dir) {
					if m.kind != "Namespace" {
						kust[m.kind+"/"+m.name] = canonical(t, m)
					}
				}
			}
			chart := map[string]string{}
			for _, m := range mustHelmTemplate(t, c.values) {
				chart[m.kind+"/"+m.name] = canonical(t, m)
			}
			if k, h := slices.Sorted(maps.Keys(kust)), slices.Sorted(maps.Keys(chart)); !slices.Equal(k, h) {
				t.Fatalf("kustomize renders %v\nthe chart renders %v", k, h)
			}
			for key, k := range kust {
				if h := chart[key]; h != k {
					t.Errorf("%s differs:\n%s", key, lineDiff(k, h))
				}
			}
		})
	}
}

// lineDiff lists the lines only one side has (- kustomize, + chart).
func lineDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out bytes.Buffer
	for _, l := range al {
		if !slices.Contains(bl, l) {
			fmt.Fprintf(&out, "- %s\n", l)
		}
	}
	for _, l := range bl {
		if !slices.Contains(al, l) {
			fmt.Fprintf(&out, "+ %s\n", l)
		}
	}
	if out.Len() == 0 {
		return "(the same lines in another order)"
	}
	return out.String()
}
