// Package reliability holds the crash tests of qoscni: the plugin and the
// agent are built with the faultinject tag (internal/fault), killed with
// SIGKILL between two steps that change the kernel or the disk, and what a
// runtime or the restarted agent does next must leave nothing behind in the
// node namespace: no link, IFB, qdisc, nftables element, address
// reservation or state record, and the next ADD of the same pod succeeds.
//
// The package has tests only:
//
//	QOSCNI_REQUIRE_ROOT=1 go test -count=1 -v ./reliability/
package reliability
