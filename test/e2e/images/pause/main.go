// Command pause is the pod sandbox process of the e2e images (the image
// images.Pause): it holds the pod's namespaces open by blocking forever,
// reaps the zombies reparented to it as PID 1 of the pod's PID namespace,
// and exits 0 on SIGINT or SIGTERM.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: pause (takes no arguments)")
		os.Exit(2)
	}
	// As PID 1 the kernel drops signals without a handler: Notify installs
	// them.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGCHLD, syscall.SIGINT, syscall.SIGTERM)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap waits for every child that has exited; signals coalesce, so one
// SIGCHLD may stand for several children.
func reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil { // no exited child left (0), or none at all (ECHILD)
			return
		}
	}
}
