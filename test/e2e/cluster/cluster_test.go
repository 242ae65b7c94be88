package cluster_test

import (
	"context"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/qoscni/qoscni/test/e2e/cluster"
)

// The control plane as later tests rely on it: the admin can create a
// node-bound pod (no ServiceAccount admission, no scheduler needed), the
// API server names its version, and a kubeconfig from WriteKubeconfig
// authenticates as its user under RBAC and the Node authorizer.
func TestControlPlane(t *testing.T) {
	cp := cluster.StartControlPlane(t)
	ctx := context.Background()

	v, err := cp.Client.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("API server %s", v.GitVersion)
	if v.GitVersion == "" || v.GitVersion == "v0.0.0-master+$Format:%H$" {
		t.Errorf("unstamped API server version %q (test/e2e/build.sh sets it)", v.GitVersion)
	}
	if _, err := cp.Client.CoreV1().Pods("default").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p"},
		Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "c", Image: "registry.k8s.io/pause:3.10"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create a node-bound pod: %v", err)
	}

	// A user with no RBAC binding: authenticated, but forbidden.
	nobody := client(t, cp, "nobody")
	if _, err := nobody.CoreV1().Pods("default").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list pods as an unbound user: %v, want forbidden", err)
	}
	// A kubelet's identity: the Node authorizer lets it read pods.
	node := client(t, cp, "system:node:n1", "system:nodes")
	if _, err := node.CoreV1().Pods("default").Get(ctx, "p", metav1.GetOptions{}); err != nil {
		t.Errorf("get its pod as system:node:n1: %v", err)
	}
}

func client(t *testing.T, cp *cluster.ControlPlane, user string, groups ...string) kubernetes.Interface {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := cp.WriteKubeconfig(path, user, groups...); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
