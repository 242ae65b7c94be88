// Command apply is the agent's NetworkPolicy update in a process of its
// own, for TestAgentKilledMidUpdate: it compiles the Input (JSON) it is
// given and writes it in the node namespace it is given, as the
// controller's sync does; built with -tags faultinject, QOSCNI_FAULT
// kills it at a point of the update.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/agent/netpol"
	"github.com/qoscni/qoscni/internal/cni/netpolnft"
)

func main() {
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "apply:", err)
		os.Exit(1)
	}
}

func run(netnsPath, inputPath string) error {
	data, err := os.ReadFile(inputPath)
	if err != nil {
		return err
	}
	var in netpol.Input
	if err := json.Unmarshal(data, &in); err != nil {
		return err
	}
	fd, err := unix.Open(netnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	m, err := netpolnft.New(fd)
	if err != nil {
		return err
	}
	defer m.Close()
	d, err := netpol.Compile(in, netpol.NewIdentities())
	if err != nil {
		return err
	}
	_, err = m.Apply(d.State())
	return err
}
