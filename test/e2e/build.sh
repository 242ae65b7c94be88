#!/usr/bin/env bash
# Builds the third-party binaries the e2e tests run (etcd, the Kubernetes
# components, crictl, CoreDNS, containerd 2, helm; and the reference CNI
# plugins v1.10 test/bench/addel.sh compares with) from the Go module proxy, into a
# cache keyed by component and version, and skips what is cached. Sources are
# pinned by the build modules under test/e2e/build/ (their go.mod and go.sum),
# not by this script.
#
#   test/e2e/build.sh [COMPONENT...]   build the named components (default: all)
#   test/e2e/build.sh --path COMPONENT print the cached binary; exit 1 if not built
#   test/e2e/build.sh --list           components, versions and cache state
#   test/e2e/build.sh --bump-k8s VER   repin test/e2e/build/k8s to k8s.io/kubernetes VER
#
# QOSCNI_E2E_CACHE  cache root (default /var/cache/qoscni-e2e); a binary is
#                   $QOSCNI_E2E_CACHE/<component>-<version>/<binary>, where
#                   the binary is named as the component unless the table
#                   says otherwise
# GO                the go command (default: go in PATH, then /usr/local/go/bin)
#
# First builds on a 2-core machine: etcd about 1.5 min, kube-apiserver about
# 12 min (kubelet about 2.5 min, kubectl about 1 min and kube-proxy about 20 s
# after it, sharing the Go build cache); CoreDNS about 3 min and containerd 2
# about 1.5 min even on an empty Go build cache (its shim and ctr take seconds
# after it); helm about 1.5 min. Cached: well under a second.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
cache=${QOSCNI_E2E_CACHE:-/var/cache/qoscni-e2e}
export PATH="$PATH:/usr/local/go/bin"
GO=${GO:-go}

# One line per binary. The build module is a directory under test/e2e/build/, the
# module is the one whose version keys the cache, the package is what to build.
# The binary column, when present, is the file's name where the program
# cares what it is called (containerd's shim is found, and cleaned up, by its
# name); the component name keeps containerd 2 apart from Debian's 1.6.
# component      build-module  module                      package [binary]
components="
etcd             etcd          go.etcd.io/etcd/server/v3   go.etcd.io/etcd/server/v3
kube-apiserver   k8s           k8s.io/kubernetes           k8s.io/kubernetes/cmd/kube-apiserver
kubelet          k8s           k8s.io/kubernetes           k8s.io/kubernetes/cmd/kubelet
kube-controller-manager k8s    k8s.io/kubernetes           k8s.io/kubernetes/cmd/kube-controller-manager
kube-scheduler   k8s           k8s.io/kubernetes           k8s.io/kubernetes/cmd/kube-scheduler
kubectl          k8s           k8s.io/kubernetes           k8s.io/kubernetes/cmd/kubectl
kube-proxy       k8s           k8s.io/kubernetes           k8s.io/kubernetes/cmd/kube-proxy
crictl           cri-tools     sigs.k8s.io/cri-tools       sigs.k8s.io/cri-tools/cmd/crictl
coredns          coredns       github.com/coredns/coredns  github.com/coredns/coredns
containerd2      containerd    github.com/containerd/containerd/v2 github.com/containerd/containerd/v2/cmd/containerd containerd
containerd2-shim containerd    github.com/containerd/containerd/v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 containerd-shim-runc-v2
ctr2             containerd    github.com/containerd/containerd/v2 github.com/containerd/containerd/v2/cmd/ctr ctr
helm             helm          helm.sh/helm/v4             helm.sh/helm/v4/cmd/helm
cni-bridge       cni-plugins   github.com/containernetworking/plugins github.com/containernetworking/plugins/plugins/main/bridge bridge
cni-host-local   cni-plugins   github.com/containernetworking/plugins github.com/containernetworking/plugins/plugins/ipam/host-local host-local
cni-portmap      cni-plugins   github.com/containernetworking/plugins github.com/containernetworking/plugins/plugins/meta/portmap portmap
cni-bandwidth    cni-plugins   github.com/containernetworking/plugins github.com/containernetworking/plugins/plugins/meta/bandwidth bandwidth
"

die() { echo "test/e2e/build.sh: $*" >&2; exit 1; }

# field COMPONENT N: column N of the component's line.
field() {
	local f
	f=$(awk -v c="$1" -v n="$2" '$1 == c { print $n }' <<<"$components")
	[ -n "$f" ] || die "unknown component $1 (known: $(all))"
	echo "$f"
}

all() { awk 'NF { printf "%s ", $1 }' <<<"$components"; }

# version COMPONENT: the pinned version of its module, from the build
# module's go.mod (no network, so a cache hit needs no module download).
version() {
	local dir mod v
	dir=$here/build/$(field "$1" 2)
	mod=$(field "$1" 3)
	v=$(awk -v m="$mod" '($1 == m && $2 ~ /^v/) { print $2; exit } ($1 == "require" && $2 == m) { print $3; exit }' "$dir/go.mod")
	[ -n "$v" ] || die "$mod is not required in $dir/go.mod"
	echo "$v"
}

# binary COMPONENT: the file name of its binary.
binary() {
	local b
	b=$(awk -v c="$1" '$1 == c { print $5 }' <<<"$components")
	echo "${b:-$1}"
}

bin_path() {
	local v
	v=$(version "$1")
	echo "$cache/$1-$v/$(binary "$1")"
}

build_one() {
	local c=$1 dir mod pkg v out tmp ldflags tags start
	dir=$here/build/$(field "$c" 2)
	mod=$(field "$c" 3)
	pkg=$(field "$c" 4)
	v=$(version "$c")
	out=$(bin_path "$c")
	if [ -x "$out" ]; then
		echo "$c $v: cached ($out)"
		return
	fi
	ldflags="-s -w"
	if [ "$mod" = k8s.io/kubernetes ]; then
		# What `make` in kubernetes stamps; otherwise the binaries report
		# v0.0.0-master to `--version`, kubectl version and node status.
		local minor=${v#v1.}
		minor=${minor%%.*}
		local vp=k8s.io/component-base/version
		ldflags+=" -X $vp.gitVersion=$v -X $vp.gitMajor=1 -X $vp.gitMinor=$minor -X $vp.gitTreeState=clean"
		ldflags+=" -X $vp.buildDate=1970-01-01T00:00:00Z"
	fi
	tags=""
	if [ "$mod" = github.com/containerd/containerd/v2 ]; then
		# What containerd's Makefile stamps and tags (crictl version and
		# the kubelet's node status show the version). Without cgo the
		# btrfs snapshotter is left out by its own build constraint
		# (!no_btrfs && cgo); nothing else containerd or its shim needs
		# is cgo. The shim has no gRPC server (no_grpc), as upstream builds it.
		ldflags+=" -X $mod/version.Version=$v -X $mod/version.Package=$mod"
		tags=urfave_cli_no_docs
		[ "$(binary "$c")" = containerd-shim-runc-v2 ] && tags+=",no_grpc"
	fi
	if [ "$mod" = github.com/containernetworking/plugins ]; then
		# What the plugins' build script stamps: they report it to VERSION.
		ldflags+=" -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$v"
	fi
	if [ "$mod" = helm.sh/helm/v4 ]; then
		# What helm's Makefile stamps: helm version reports the release.
		ldflags+=" -X $mod/internal/version.version=$v"
	fi
	mkdir -p "$(dirname "$out")"
	tmp=$(mktemp "$out.XXXXXX")
	start=$SECONDS
	echo "$c $v: building $pkg ..."
	# Renamed into place only when complete: an existing binary is a good one.
	if ! (cd "$dir" && CGO_ENABLED=0 $GO build -tags "$tags" -ldflags "$ldflags" -o "$tmp" "$pkg"); then
		rm -f "$tmp"
		die "$c $v: build failed"
	fi
	chmod 0755 "$tmp"
	mv -f "$tmp" "$out"
	echo "$c $v: built in $((SECONDS - start)) s ($out)"
}

bump_k8s() {
	local v=$1 staging gomod dir=$here/build/k8s tmp
	[[ $v =~ ^v1\.[0-9]+\.[0-9]+$ ]] || die "--bump-k8s wants a release like v1.37.2, not $v"
	staging="v0.${v#v1.}"
	gomod=$($GO mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
	[ -f "$gomod" ] || die "k8s.io/kubernetes@$v: no go.mod from the proxy"
	cd "$dir"
	tmp=$(mktemp go.mod.XXXXXX)
	# The replace block is ours alone: rewritten in place from every
	# staging module kubernetes replaces with ./staging/src/... .
	sed -n '/^replace (/,/^)/p' "$gomod" |
		awk -v s="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s %s\n", $1, $1, s }' >"$tmp.block"
	awk -v block="$tmp.block" '
		function emit(  l) { if (done++) return; print "replace ("; while ((getline l < block) > 0) print l; print ")" }
		/^replace \($/ { skip = 1; emit(); next }
		skip { if ($0 == ")") skip = 0; next }
		/^replace / { emit(); next }
		{ print }
		END { if (!done) { print ""; emit() } }' go.mod >"$tmp"
	rm -f "$tmp.block"
	mv "$tmp" go.mod
	$GO mod edit -require="k8s.io/kubernetes@$v"
	$GO mod tidy
	echo "test/e2e/build/k8s now pins k8s.io/kubernetes $v with its staging modules at $staging"
}

export GOTOOLCHAIN=local GOWORK=off
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath"

case "${1:-}" in
--path)
	[ $# -eq 2 ] || die "usage: --path COMPONENT"
	p=$(bin_path "$2")
	[ -x "$p" ] || { echo "$p" >&2; exit 1; }
	echo "$p"
	exit 0
	;;
--list)
	for c in $(all); do
		p=$(bin_path "$c")
		s=missing
		[ -x "$p" ] && s=cached
		printf '%-16s %-10s %-7s %s\n' "$c" "$(version "$c")" "$s" "$p"
	done
	exit 0
	;;
--bump-k8s)
	[ $# -eq 2 ] || die "usage: --bump-k8s VERSION"
	bump_k8s "$2"
	exit 0
	;;
-*)
	die "unknown option $1"
	;;
esac

command -v "$GO" >/dev/null || die "no go command (set GO or install Go in /usr/local/go)"
mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] || die "cache $cache is not writable (set QOSCNI_E2E_CACHE)"
# Two builds at once (parallel CI jobs, a developer and CI) would only
# race each other to the same result.
exec 9>"$cache/.lock"
flock 9

[ $# -gt 0 ] || set -- $(all)
total=$SECONDS
for c in "$@"; do
	build_one "$c"
done
echo "e2e binaries ready in $((SECONDS - total)) s ($($GO version | awk '{print $3}'))"
