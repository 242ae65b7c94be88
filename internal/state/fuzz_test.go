package state_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/qoscni/qoscni/internal/state"
)

// FuzzDecodeRecord: whatever is in a state file, Decode returns an error or
// a record that the store can write back (Save uses MarshalIndent) and that
// decodes to the same record. The agent reads every file of the store.
func FuzzDecodeRecord(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := state.Decode(data)
		if err != nil {
			if r != nil {
				t.Fatal("record returned with an error")
			}
			if !strings.HasPrefix(err.Error(), "decode record: ") {
				t.Fatalf("error does not say what failed: %v", err)
			}
			return
		}
		if r.Schema != state.SchemaVersion || r.Network == "" || r.ContainerID == "" || r.IfName == "" {
			t.Fatalf("accepted a record without its required fields: %+v", r)
		}
		enc, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			t.Fatalf("accepted record cannot be saved again: %v", err)
		}
		r2, err := state.Decode(enc)
		if err != nil {
			t.Fatalf("re-encoded record rejected: %v\n%s", err, enc)
		}
		enc2, err := json.MarshalIndent(r2, "", "  ")
		if err != nil || !bytes.Equal(enc, enc2) {
			t.Fatalf("encoding not stable (%v):\n%s\n%s", err, enc, enc2)
		}
		// The encodings match; times also compare as instants (the
		// location pointer differs, and "[]" vs absent is not data).
		if !r.Created.Equal(r2.Created) || !r.Updated.Equal(r2.Updated) {
			t.Fatalf("times changed: %v %v -> %v %v", r.Created, r.Updated, r2.Created, r2.Updated)
		}
		if r2.Key() != r.Key() {
			t.Fatalf("key changed: %+v -> %+v", r.Key(), r2.Key())
		}
	})
}
