// Package fault lets the reliability tests kill a process at a named point
// between two steps that change the kernel or the disk, to prove that what
// a runtime does next (DEL, DEL again, GC) leaves nothing behind.
//
// Only a binary built with the faultinject build tag has the hook:
//
//	go build -tags faultinject ./cmd/qoscni
//	QOSCNI_FAULT=ADD:veth qoscni ...   # SIGKILL right after ADD's veth step
//
// Release builds compile At to nothing: the environment is never read.
package fault

// Env names the point to die at, "<op>:<step>" (e.g. "ADD:ipam",
// "DEL:state", "reshape:apply"); optionally "<op>:<step>@<n>" to die at the
// n-th time the point is reached in this process (default the first).
const Env = "QOSCNI_FAULT"
