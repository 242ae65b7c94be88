package podnet

import (
	"crypto/sha256"
	"encoding/hex"
)

// Device names are derived from the attachment alone, so DEL, GC and the
// agent find them again without any state, and two interfaces of one pod
// never collide. 2-byte prefix + 12 hex digits = 14 bytes (IFNAMSIZ-1 = 15).
const (
	hostVethPrefix = "qv"
	ifbPrefix      = "qi"
)

func attachmentHash(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifName))
	return hex.EncodeToString(sum[:6])
}

// HostVethName is the host end of the attachment's veth pair.
func HostVethName(containerID, ifName string) string {
	return hostVethPrefix + attachmentHash(containerID, ifName)
}

// IFBName is the attachment's IFB device for shaping pod egress.
func IFBName(containerID, ifName string) string {
	return ifbPrefix + attachmentHash(containerID, ifName)
}
