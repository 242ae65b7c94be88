// Package ipam is qoscni's own address allocator, a host-local compatible IPAM.
//
// State lives on disk so that it survives plugin crashes and node reboots, and every
// operation runs under an exclusive flock because one plugin process runs per pod event.
// Layout of one store, dataDir/<network>/:
//
//	lock                      flock target, empty
//	<ip>                      one file per reserved address (canonical text form, e.g.
//	                          10.22.0.7 or fd00::7); it is the truth: its existence means
//	                          "used", its JSON content names the owning attachment
//	last_reserved_ip.<set>    round-robin hint per range set
//	attachments/<cid>_<if>    per-attachment index of the addresses it holds, so that Get,
//	                          Release and idempotent Allocate never scan the store
//	.tmp-*                    in-flight temporary files, removed by GC after a crash
//
// An address file is published with link(2) from a fully written and fsynced temporary
// file: like O_CREAT|O_EXCL the link fails if the name exists, but a crash can never leave
// an empty address file whose owner is unknown.
package ipam
