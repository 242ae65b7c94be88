# qoscni: build, test, demo and benchmarks. Targets that touch the kernel
# (test, demo, bench-*) need root; see README.md.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin

GO     ?= go
# Kernel tests build their own node/pod namespaces, so packages cannot
# collide: two at a time matches the 2-core CI machines.
TEST_P ?= 2

# "needs root" tests fail instead of skipping when this is 1 (set by .ci/run).
ifdef QOSCNI_REQUIRE_ROOT
export QOSCNI_REQUIRE_ROOT
endif

.PHONY: all build test unit vet fmt-check tidy-check race deps demo bench-addel bench-floor bench-shaping bench-guarantees bench-portmap bench-controls bench-agent bench-reshape image clean e2e-build e2e-cri e2e-k8s e2e-k8s-iptables bench-fuzz bench-noderoutes bench-netpol

all: build

# Static and stripped: the plugin runs once per pod event, and dynamic
# loading alone costs it about 3 ms per call on these machines.
GOBUILD := CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w"

# The agent reports VERSION (qoscni_build_info).
VERSION ?= dev

# grpcnotrace: gRPC (the agent's DRA driver) otherwise links
# golang.org/x/net/trace, whose html/template keeps every exported method
# of every type alive and doubles the agent (66 MB against 36 MB).
AGENT_TAGS := grpcnotrace

build:
	$(GOBUILD) -o bin/qoscni ./cmd/qoscni
	$(GOBUILD) -o bin/qoscni-cnitool ./cmd/qoscni-cnitool
	CGO_ENABLED=0 $(GO) build -tags $(AGENT_TAGS) -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o bin/qoscni-agent ./cmd/qoscni-agent
	CGO_ENABLED=0 $(GO) build -tags $(AGENT_TAGS) -trimpath -ldflags "-s -w" -o bin/kubectl-qoscni ./cmd/kubectl-qoscni

# Unit and kernel tests, then both end-to-end harnesses. The control-plane
# tests and the harnesses need etcd, the Kubernetes components and crictl:
# built once (23 min on 2 cores, measured on empty caches), cached by version after that.
test: unit e2e-cri e2e-k8s e2e-k8s-iptables

# The hygiene checks first (under a minute), then every package's tests.
unit: deps tidy-check fmt-check vet race e2e-build
	$(GO) test -count=1 -p $(TEST_P) ./...

# go.mod and go.sum as go mod tidy leaves them: what the code imports is
# required directly, nothing unused stays.
tidy-check:
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum differ from what go mod tidy writes (diff above): run go mod tidy"; exit 1; }

# The pure-logic packages under the race detector: config, shaping policy,
# IPAM, portmap planning, state encoding, DRA grants and the driver
# (its gRPC servers and slice publisher), and the journal and file
# primitives under them. Their kernel tests skip here (QOSCNI_PURE_ONLY):
# the race detector makes namespaces and traffic slow, and unit's plain run
# runs them. -race needs cgo (gcc, installed by deps).
RACE_PKGS := ./internal/cni/netconf ./shaping ./ipam ./portmap ./internal/state \
	./internal/journal ./internal/atomicfile ./internal/flock ./internal/paths ./internal/grant \
	./internal/agent/dra
race:
	QOSCNI_PURE_ONLY=1 CGO_ENABLED=1 $(GO) test -race -count=1 -p $(TEST_P) $(RACE_PKGS)

# containerd's CRI runs pods with qoscni, standalone and chained (about 3 min).
e2e-cri: deps e2e-build
	test/e2e/run.sh cri

# A two-node Kubernetes (etcd, apiserver, controller-manager, scheduler;
# per node a kubelet, kube-proxy and containerd: 1.6 on one, 2 on the other;
# CoreDNS) runs qoscni installed with the Helm chart (deploy/helm/qoscni;
# about 3 min). kube-proxy in its nftables mode; e2e-k8s-iptables runs the
# same suite with the iptables mode and qoscni installed with kustomize
# (deploy/).
e2e-k8s: deps e2e-build
	test/e2e/run.sh k8s

e2e-k8s-iptables: deps e2e-build
	QOSCNI_E2E_PROXY_MODE=iptables QOSCNI_E2E_INSTALL=kustomize test/e2e/run.sh k8s

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './.git/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

deps:
	scripts/deps.sh

# etcd, the Kubernetes components, crictl, CoreDNS and containerd 2 for the
# e2e harnesses (test/e2e/README.md), built from the Go module proxy and cached
# by version under ${QOSCNI_E2E_CACHE:-/var/cache/qoscni-e2e}: 23 min the
# first time on 2 cores, instant after. Without them those tests skip.
e2e-build:
	test/e2e/build.sh

demo: deps
	scripts/demo.sh

bench-addel: deps build
	test/bench/addel.sh

# What any plugin pays on this machine before its own work (issue 21).
bench-floor: deps
	test/bench/floor.sh

bench-shaping: deps build
	test/bench/shaping.sh

# Guaranteed bandwidth (issue 17): three pods behind an emulated uplink,
# requests 60/20/0 %, against the reference bandwidth plugin.
bench-guarantees: deps build
	test/bench/guarantees.sh

bench-portmap: deps build
	test/bench/portmap.sh

# Packet-rate, connection and DSCP controls: one pod's Set and Del at 1,
# 100 and 1000 pods holding them, and the table's rule count.
bench-controls: deps build
	test/bench/controls.sh

bench-agent: deps build
	test/bench/agent.sh

bench-reshape: deps build
	test/bench/reshape.sh

# Routes to other nodes' pods (host-gw): Node to route latency, throughput.
bench-noderoutes: deps
	test/bench/noderoutes.sh

# NetworkPolicy: API change to the node's nftables, at 500 pods.
bench-netpol: deps
	test/bench/netpol.sh

# Every go test -fuzz target for $${FUZZTIME:-60s}; failures stay in testdata.
bench-fuzz:
	test/bench/fuzz.sh

# The image, the one way it is built (no Docker daemon runs on these
# machines, and the e2e harness tests this path): a docker-archive tarball
# with both static binaries; import with
# ctr -n k8s.io images import bin/qoscni-image.tar (docs/install.md: a registry).
IMAGE ?= qoscni/qoscni:dev
image: build
	$(GO) run ./cmd/qoscni-image -o bin/qoscni-image.tar --tag $(IMAGE) --plugin bin/qoscni --agent bin/qoscni-agent

clean:
	rm -rf bin
