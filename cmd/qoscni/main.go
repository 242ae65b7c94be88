// Command qoscni is the CNI plugin binary: one process per runtime call.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/qoscni/qoscni/internal/cni/netconf"
	"github.com/qoscni/qoscni/internal/cni/plugin"
	"github.com/qoscni/qoscni/internal/journal"
)

func main() {
	// Every call's outcome and duration go to the journal the node agent
	// turns into metrics, filed under the network the plugin's one parse of
	// stdin found; a journal that cannot be written changes nothing.
	funcs := journal.Wrap(plugin.New().Funcs())
	skel.PluginMainFuncs(funcs, version.PluginSupports(netconf.SupportedVersions...), "qoscni: traffic-control-first CNI plugin")
}
