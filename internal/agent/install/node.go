package install

import (
	"context"
	"errors"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// NodePodCIDRs reads spec.podCIDRs (or the older spec.podCIDR) of the node
// from the API server, with kubeconfig or, when it is "", the pod's service
// account. RBAC: get on nodes.
func NodePodCIDRs(kubeconfig, node string) PodCIDRSource {
	return func(ctx context.Context) ([]string, error) {
		if node == "" {
			return nil, errors.New("node name is empty (set " + NodeNameEnv + " from spec.nodeName)")
		}
		var cfg *rest.Config
		var err error
		if kubeconfig != "" {
			cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		} else {
			cfg, err = rest.InClusterConfig()
		}
		if err != nil {
			return nil, fmt.Errorf("Kubernetes API config: %w", err)
		}
		cfg.UserAgent = AgentBinary + "-install"
		cfg.Timeout = 30 * time.Second
		c, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
		n, err := c.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("get node %s: %w", node, err)
		}
		if len(n.Spec.PodCIDRs) > 0 {
			return n.Spec.PodCIDRs, nil
		}
		if n.Spec.PodCIDR != "" {
			return []string{n.Spec.PodCIDR}, nil
		}
		return nil, nil
	}
}
