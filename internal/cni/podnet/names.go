package podnet

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// Device names are derived from the attachment alone, so DEL, GC and the
// agent find them again without any state, and two interfaces of one pod
// never collide. 2-byte prefix + 12 hex digits = 14 bytes (IFNAMSIZ-1 = 15).
const (
	hostVethPrefix = "qv"
	ifbPrefix      = "qi"
)

// hashBytes of SHA-256 name an attachment: 12 hex digits.
const hashBytes = 6

func attachmentHash(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifName))
	return hex.EncodeToString(sum[:hashBytes])
}

// HostVethName is the host end of the attachment's veth pair.
func HostVethName(containerID, ifName string) string {
	return hostVethPrefix + attachmentHash(containerID, ifName)
}

// IFBName is the attachment's IFB device for shaping pod egress.
func IFBName(containerID, ifName string) string {
	return ifbPrefix + attachmentHash(containerID, ifName)
}

// NameMatcher recognises the device names derived here, for the agent's
// GC and uninstall, which look for qoscni's devices without a record. It
// has a regexp's MatchString, without compiling one at every plugin start.
type NameMatcher struct{ prefixes []string }

// Matchers of the derived names.
var (
	// HostVethNames matches HostVethName's names (standalone mode).
	HostVethNames = NameMatcher{[]string{hostVethPrefix}}
	// IFBNames matches IFBName's names.
	IFBNames = NameMatcher{[]string{ifbPrefix}}
	// DeviceNames matches both.
	DeviceNames = NameMatcher{[]string{hostVethPrefix, ifbPrefix}}
)

// MatchString reports whether name is one of the matcher's prefixes
// followed by an attachment hash (12 lower-case hex digits).
func (m NameMatcher) MatchString(name string) bool {
	for _, p := range m.prefixes {
		if h, ok := strings.CutPrefix(name, p); ok && isHash(h) {
			return true
		}
	}
	return false
}

func isHash(s string) bool {
	if len(s) != 2*hashBytes {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
