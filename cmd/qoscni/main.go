// Command qoscni is the CNI plugin binary: one process per runtime call.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/qoscni/qoscni/netconf"
	"github.com/qoscni/qoscni/plugin"
)

func main() {
	skel.PluginMainFuncs(plugin.New().Funcs(), version.PluginSupports(netconf.SupportedVersions...), "qoscni: traffic-control-first CNI plugin")
}
