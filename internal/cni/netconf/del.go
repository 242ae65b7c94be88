package netconf

import (
	"encoding/json"
	"errors"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
)

// ParseForDel decodes stdin for DEL. A runtime repeats DEL until it
// succeeds, so a config that ADD refused (a bad portMappings entry, a bad
// ipam section, a value out of range) must not make DEL fail forever: when
// the strict parse refuses a value, DEL works from what identifies the
// attachment and where its traces are kept (name, stateDir, ipMasq, the
// ipam type and dataDir), and Problem says what was wrong. Only stdin that
// is not a JSON object, an unsupported cniVersion or a missing name is
// still an error: then nothing can be identified.
func ParseForDel(stdin []byte) (*NetConf, Header, error) {
	conf, h, err := Parse(stdin)
	if err == nil {
		return conf, h, nil
	}
	var te *types.Error
	if !errors.As(err, &te) || te.Code == types.ErrIncompatibleCNIVersion {
		return nil, h, err
	}
	var raw map[string]json.RawMessage
	if json.Unmarshal(stdin, &raw) != nil {
		return nil, h, err
	}
	c := &NetConf{Raw: stdin, Bridge: DefaultBridge, StateDir: DefaultStateDir, Problem: err}
	field(raw, "cniVersion", &c.CNIVersion)
	field(raw, "type", &c.Type)
	if !field(raw, "name", &c.Name) || c.Name == "" {
		return nil, h, err
	}
	var dir string
	if field(raw, "stateDir", &dir) && strings.HasPrefix(dir, "/") {
		c.StateDir = dir
	}
	field(raw, "ipMasq", &c.IPMasq)
	var ipamRaw map[string]json.RawMessage
	if field(raw, "ipam", &ipamRaw) {
		field(ipamRaw, "type", &c.IPAM.Type)
	}
	if c.IPAM.Type == "" || c.IPAM.Type == "qoscni" {
		if ic, ierr := decodeIPAM(stdin); ierr == nil {
			c.IPAMConfig = ic
		} else if ipamRaw != nil {
			// The ranges do not validate: the store is still found by
			// its directory, and addresses are freed by owner.
			field(ipamRaw, "dataDir", &c.IPAMStoreDir)
			c.IPAMStoreOnly = true
		}
	}
	return c, h, nil
}

// field decodes the value of key, matched without regard to case as
// encoding/json matches struct fields, and reports whether it could.
func field(raw map[string]json.RawMessage, key string, v any) bool {
	for k, r := range raw {
		if strings.EqualFold(k, key) {
			return json.Unmarshal(r, v) == nil
		}
	}
	return false
}
