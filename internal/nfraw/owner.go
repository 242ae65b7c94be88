package nfraw

import (
	"fmt"
	"strings"

	"github.com/qoscni/qoscni/internal/state"
)

// Owner identifies the attachment holding a set element. ContainerID and
// IfName are the identity; the pod name is carried for error messages.
type Owner struct {
	ContainerID, IfName, PodNamespace, PodName string
}

// OwnerOf is the owner of an attachment's elements, from its record.
func OwnerOf(rec *state.Record) Owner {
	return Owner{ContainerID: rec.ContainerID, IfName: rec.IfName, PodNamespace: rec.Pod.Namespace, PodName: rec.Pod.Name}
}

// Same reports whether both name one attachment.
func (o Owner) Same(p Owner) bool { return o.ContainerID == p.ContainerID && o.IfName == p.IfName }

// String names the owner for humans: the pod if known, else the container.
func (o Owner) String() string {
	if o.ContainerID == "" {
		return "an element without a qoscni owner tag (added by hand?)"
	}
	if o.PodName != "" {
		ns := o.PodNamespace
		if ns == "" {
			ns = "default"
		}
		return fmt.Sprintf("pod %s/%s (container %s, %s)", ns, o.PodName, shortID(o.ContainerID), o.IfName)
	}
	return fmt.Sprintf("container %s (%s)", o.ContainerID, o.IfName)
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// The owner is stored in each element's comment (userdata), so a conflict
// names the owner from one exact-key lookup, and GC needs nothing but the
// kernel. Format: containerID/ifname/namespace/name; none of these can hold
// a '/' (CNI container IDs are [A-Za-z0-9_.-], ifnames exclude '/', pod
// names are DNS names).
const maxComment = 200 // kernel: NFT_USERDATA_MAXLEN 256, TLV length is 1 byte

// EncodeOwner is the comment an element of o carries.
func EncodeOwner(o Owner) string {
	s := o.ContainerID + "/" + o.IfName
	if rest := "/" + o.PodNamespace + "/" + o.PodName; len(s)+len(rest) <= maxComment {
		s += rest
	}
	if len(s) > maxComment {
		s = s[:maxComment]
	}
	return s
}

// DecodeOwner reads an element comment back; false: not an owner tag.
func DecodeOwner(s string) (Owner, bool) {
	parts := strings.SplitN(s, "/", 4)
	if len(parts) < 2 || parts[0] == "" || parts[1] == "" {
		return Owner{}, false
	}
	o := Owner{ContainerID: parts[0], IfName: parts[1]}
	if len(parts) == 4 {
		o.PodNamespace, o.PodName = parts[2], parts[3]
	}
	return o, true
}

// Sightings decides which record-less owners a periodic GC may remove. An
// ADD writes its elements before its record, so an owner without a record
// is removed only when two passes in a row found it so.
type Sightings struct {
	prev map[string]bool
}

// Pass starts a GC pass over the attachments with a record (live). The
// returned function says whether an owner's element stays, and remembers
// those it spared for lack of a record.
func (s *Sightings) Pass(live []*state.Record) func(Owner) bool {
	alive := make(map[string]bool, len(live))
	for _, r := range live {
		alive[r.ContainerID+"/"+r.IfName] = true
	}
	seen := map[string]bool{}
	prev := s.prev
	s.prev = seen
	return func(o Owner) bool {
		k := o.ContainerID + "/" + o.IfName
		if alive[k] {
			return true
		}
		seen[k] = true
		return !prev[k]
	}
}
