// Package kube connects the node agent to the Kubernetes API: a shared
// informer over the pods of this node (field selector spec.nodeName), fed
// to the reconciler, and Events on pods with bad bandwidth annotations.
// It needs get/list/watch on pods and create on events, nothing else.
package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/qoscni/qoscni/internal/agent/reconcile"
)

// ErrNoAPI says there is neither a kubeconfig nor an in-cluster config.
var ErrNoAPI = errors.New("no Kubernetes API access: no kubeconfig given and not running in a cluster")

// UserAgent identifies the agent to the API server.
const UserAgent = "qoscni-agent"

// NewClient builds a clientset from kubeconfig, or from the in-cluster
// service account when kubeconfig is "". ErrNoAPI when neither exists.
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("load kubeconfig %s: %w", kubeconfig, err)
		}
	} else {
		cfg, err = rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) {
			return nil, ErrNoAPI
		}
		if err != nil {
			return nil, fmt.Errorf("in-cluster config: %w", err)
		}
	}
	cfg.UserAgent = UserAgent
	// Protobuf: smaller and cheaper to decode than JSON for pod lists.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return c, nil
}

// Handler is told which pod to look at again.
type Handler interface {
	PodChanged(namespace, name string)
}

// PodWatcher is an informer over the node's pods; it implements
// reconcile.PodSource.
type PodWatcher struct {
	node     string
	factory  informers.SharedInformerFactory
	informer cache.SharedIndexInformer
	lister   listersv1.PodLister
	log      *slog.Logger
}

// NewPodWatcher watches the pods bound to node. Add and annotation changes
// relevant to shaping go to h; no periodic resync (the reconciler has its
// own pass), so an idle node costs nothing.
func NewPodWatcher(client kubernetes.Interface, node string, h Handler, log *slog.Logger) (*PodWatcher, error) {
	if node == "" {
		return nil, errors.New("watch pods: node name is empty (set NODE_NAME from spec.nodeName)")
	}
	if log == nil {
		log = slog.Default()
	}
	f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
	}))
	pods := f.Core().V1().Pods()
	inf := pods.Informer()
	// Keep only what the reconciler reads: a node's pods with their
	// spec and status would be most of the agent's memory.
	if err := inf.SetTransform(slim); err != nil {
		return nil, fmt.Errorf("watch pods: %w", err)
	}
	w := &PodWatcher{node: node, factory: f, informer: inf, lister: pods.Lister(), log: log}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if p, ok := obj.(*corev1.Pod); ok && w.mine(p) {
				h.PodChanged(p.Namespace, p.Name)
			}
		},
		UpdateFunc: func(oldObj, newObj any) {
			o, ok1 := oldObj.(*corev1.Pod)
			n, ok2 := newObj.(*corev1.Pod)
			if !ok1 || !ok2 || !w.mine(n) {
				return
			}
			// The pod IP appears once its sandbox (and so its ADD) is
			// done: the moment to report its effective shaping; and a
			// report someone edited or removed is put back at once.
			if o.UID != n.UID || !reconcile.ShapingAnnotationsEqual(o.Annotations, n.Annotations) || o.Status.PodIP != n.Status.PodIP ||
				o.Annotations[reconcile.AnnotationEffective] != n.Annotations[reconcile.AnnotationEffective] {
				h.PodChanged(n.Namespace, n.Name)
			}
		},
	})
	if err != nil {
		return nil, fmt.Errorf("watch pods: %w", err)
	}
	return w, nil
}

// mine double-checks the field selector (fake clientsets do not apply it).
func (w *PodWatcher) mine(p *corev1.Pod) bool { return p.Spec.NodeName == w.node }

func slim(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown tombstone
	}
	return &corev1.Pod{
		TypeMeta: p.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion,
			Annotations: p.Annotations, DeletionTimestamp: p.DeletionTimestamp,
		},
		Spec:   corev1.PodSpec{NodeName: p.Spec.NodeName},
		Status: corev1.PodStatus{PodIP: p.Status.PodIP},
	}, nil
}

// Start runs the informer until ctx ends.
func (w *PodWatcher) Start(ctx context.Context) { w.factory.Start(ctx.Done()) }

// WaitForSync blocks until the first list arrived or ctx ended.
func (w *PodWatcher) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.informer.HasSynced)
}

// Shutdown waits for the informer goroutines after ctx ended.
func (w *PodWatcher) Shutdown() { w.factory.Shutdown() }

// Synced implements reconcile.PodSource.
func (w *PodWatcher) Synced() bool { return w.informer.HasSynced() }

// Pod implements reconcile.PodSource.
func (w *PodWatcher) Pod(namespace, name string) (reconcile.Pod, bool) {
	p, err := w.lister.Pods(namespace).Get(name)
	if err != nil || !w.mine(p) {
		return reconcile.Pod{}, false
	}
	return reconcile.Pod{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID), Annotations: p.Annotations,
		ResourceVersion: p.ResourceVersion}, true
}

// UIDs implements reconcile.PodSource.
func (w *PodWatcher) UIDs() map[string]bool {
	out := map[string]bool{}
	pods, err := w.lister.List(labels.Everything())
	if err != nil {
		return out
	}
	for _, p := range pods {
		if w.mine(p) {
			out[string(p.UID)] = true
		}
	}
	return out
}

// Events creates core/v1 Events on pods. It writes them directly rather
// than through an EventBroadcaster: the broadcaster patches repeated
// events, which would need patch on events, and the reconciler already
// reports each distinct problem once.
type Events struct {
	Client kubernetes.Interface
	Node   string
	Log    *slog.Logger
	// Timeout bounds one create (default 10 s).
	Timeout time.Duration
}

// Component is the Event source.
const Component = "qoscni-agent"

// Warn implements reconcile.EventSink. It does not block the reconciler.
func (e *Events) Warn(pod reconcile.Pod, reason, message string) {
	e.emit(pod, corev1.EventTypeWarning, reason, message)
}

// Normal implements reconcile.EventSink. It does not block the reconciler.
func (e *Events) Normal(pod reconcile.Pod, reason, message string) {
	e.emit(pod, corev1.EventTypeNormal, reason, message)
}

func (e *Events) emit(pod reconcile.Pod, typ, reason, message string) {
	now := metav1.NewTime(time.Now())
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{
			// Named as the kubelet's recorder names them: unique per pod.
			Name:      fmt.Sprintf("%s.%x", pod.Name, time.Now().UnixNano()),
			Namespace: pod.Namespace,
		},
		InvolvedObject: corev1.ObjectReference{
			Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID),
		},
		Reason:              reason,
		Message:             message,
		Type:                typ,
		Source:              corev1.EventSource{Component: Component, Host: e.Node},
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		ReportingController: "qoscni.io/agent",
		ReportingInstance:   Component + "-" + e.Node,
	}
	background(e.Log, e.Timeout, "create event", pod, reason, func(ctx context.Context) error {
		_, err := e.Client.CoreV1().Events(pod.Namespace).Create(ctx, ev, metav1.CreateOptions{})
		return err
	})
}

// background runs one API call off the reconciler's goroutine, bounded by
// timeout (0: 10 s), and logs its failure.
func background(log *slog.Logger, timeout time.Duration, what string, pod reconcile.Pod, detail string, call func(context.Context) error) {
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	if log == nil {
		log = slog.Default()
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		if err := call(ctx); err != nil {
			log.Warn(what, "namespace", pod.Namespace, "pod", pod.Name, "detail", detail, "err", err)
		}
	}()
}

// Annotator sets one annotation on a pod with a merge patch that names
// the pod's UID, so a pod recreated under the same name is not touched
// (reconcile.Annotator). It needs patch on pods.
type Annotator struct {
	Client  kubernetes.Interface
	Log     *slog.Logger
	Timeout time.Duration // one patch (default 10 s)
}

// Annotate sets key to value ("": removes it), without blocking.
func (a *Annotator) Annotate(pod reconcile.Pod, key, value string) {
	var v any = value
	if value == "" {
		v = nil // JSON null removes the key
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"uid": pod.UID, "annotations": map[string]any{key: v},
	}})
	if err != nil {
		return
	}
	background(a.Log, a.Timeout, "annotate pod", pod, key, func(ctx context.Context) error {
		_, err := a.Client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
}
