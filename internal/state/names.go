package state

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// File and directory names of the store. A record lives at
// <dir>/<escape(network)>/<escape(containerID)>_<escape(ifName)>.json.
// escape keeps [A-Za-z0-9.-] and writes every other byte (so "_", "%" and
// each byte of a UTF-8 sequence) as %XX, plus a leading "." so that no name
// is ".", ".." or hidden. "_" therefore occurs only as the separator, and
// the mapping is injective and reversible (KeyFromFileName).
//
// A name longer than maxName bytes (a 1 KiB container ID) is bounded
// instead: a prefix of the escaped container ID for people reading the
// directory, "~", 32 hex digits of SHA-256 over containerID NUL ifName, "_"
// and the escaped interface name (bounded as well). "~" never occurs in an
// escaped string, so a bounded name cannot equal a plain one. It cannot be
// reversed: KeyFromFileName reports ok=false for it.
//
// maxName leaves room under NAME_MAX (255) for atomicfile's temporary name
// (".tmp-" + name + "." + 16 hex digits).
const (
	maxName       = 200
	hashHexLen    = 32
	maxIfNamePart = 48 // the plugin allows 15 bytes: 45 when all are escaped
	recordSuffix  = ".json"
)

func keep(c byte, first bool) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' && !first
}

func escape(s string) string {
	const hexDigits = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if keep(c, i == 0) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&0xf])
	}
	return b.String()
}

// unescape inverts escape; it accepts only what escape produces, so that
// one key has exactly one file name.
func unescape(s string) (string, bool) {
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '%' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(s) {
			return "", false
		}
		hi, ok1 := unhex(s[i+1])
		lo, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return "", false
		}
		b.WriteByte(hi<<4 | lo)
		i += 2
	}
	out := b.String()
	if escape(out) != s {
		return "", false
	}
	return out, true
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false // lower case is not what escape writes
}

// truncEscaped cuts an escaped string to at most n bytes without splitting
// a %XX sequence.
func truncEscaped(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	if i := strings.LastIndexByte(s, '%'); i >= 0 && i > len(s)-3 {
		s = s[:i]
	}
	return s
}

func digest(parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return hex.EncodeToString(sum[:])[:hashHexLen]
}

// dirName is the directory of a network's records.
func dirName(network string) string {
	name := escape(network)
	if len(name) <= maxName {
		return name
	}
	return truncEscaped(name, maxName-1-hashHexLen) + "~" + digest(network)
}

// FileName is the name of the attachment's record file inside its
// network's directory; it is at most 200 bytes.
func FileName(containerID, ifName string) string {
	cid, ifn := escape(containerID), escape(ifName)
	name := cid + "_" + ifn + recordSuffix
	if len(name) <= maxName {
		return name
	}
	ifn = truncEscaped(ifn, maxIfNamePart)
	room := maxName - len("~") - hashHexLen - len("_") - len(ifn) - len(recordSuffix)
	return truncEscaped(cid, room) + "~" + digest(containerID, ifName) + "_" + ifn + recordSuffix
}

// KeyFromFileName returns the key whose record file in network's
// directory is called name (a base name such as "abc_eth0.json"). ok is
// false for any name the store does not write, and for bounded (hashed)
// names, whose container ID cannot be recovered: a caller that needs the
// key of an unreadable file with such a name cannot have it.
func KeyFromFileName(network, name string) (Key, bool) {
	base, found := strings.CutSuffix(name, recordSuffix)
	if !found {
		return Key{}, false
	}
	c, i, found := strings.Cut(base, "_")
	if !found || strings.ContainsRune(c, '~') {
		return Key{}, false
	}
	cid, ok1 := unescape(c)
	ifn, ok2 := unescape(i)
	if !ok1 || !ok2 || cid == "" || ifn == "" || FileName(cid, ifn) != name {
		return Key{}, false
	}
	return Key{Network: network, ContainerID: cid, IfName: ifn}, true
}
