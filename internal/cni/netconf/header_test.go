package netconf

import (
	"testing"
)

// TestHeaderWhateverTheOutcome: the journal files every call under the
// Header of its config, so Parse and ParseForDel return it also for a
// config they refuse, as far as stdin could be read.
func TestHeaderWhateverTheOutcome(t *testing.T) {
	cases := []struct {
		name, conf string
		want       Header
		ok, delOK  bool
	}{
		{"accepted", `{"cniVersion":"1.0.0","name":"n","type":"qoscni","stateDir":"/s"}`, Header{"n", "/s"}, true, true},
		{"defaults", `{"cniVersion":"1.0.0","name":"n","type":"qoscni"}`, Header{"n", DefaultStateDir}, true, true},
		{"bad value", `{"cniVersion":"1.0.0","name":"n","type":"qoscni","stateDir":"/s","mtu":1}`, Header{"n", "/s"}, false, true},
		{"wrong type", `{"cniVersion":"1.0.0","name":"n","type":"qoscni","mtu":"x","stateDir":"/s"}`, Header{"n", "/s"}, false, true},
		{"bad port", `{"cniVersion":"1.0.0","name":"n","type":"qoscni","stateDir":"/s","runtimeConfig":{"portMappings":[{"hostPort":0}]}}`, Header{"n", "/s"}, false, true},
		{"relative stateDir", `{"cniVersion":"1.0.0","name":"n","type":"qoscni","stateDir":"rel"}`, Header{"n", "rel"}, false, true},
		{"old version", `{"cniVersion":"0.2.0","name":"n","type":"qoscni","stateDir":"/s"}`, Header{"n", "/s"}, false, false},
		{"no name", `{"cniVersion":"1.0.0","type":"qoscni","stateDir":"/s","mtu":1}`, Header{"", "/s"}, false, false},
		{"not JSON", `{"cniVersion":"1.0.0","name":"n",`, Header{}, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, h, err := Parse([]byte(tc.conf))
			if (err == nil) != tc.ok || (c != nil) != tc.ok {
				t.Fatalf("Parse: %v, %v", c, err)
			}
			if h != tc.want {
				t.Errorf("Parse header %+v, want %+v", h, tc.want)
			}
			c, h, err = ParseForDel([]byte(tc.conf))
			if (err == nil) != tc.delOK {
				t.Fatalf("ParseForDel: %v, %v", c, err)
			}
			if h != tc.want {
				t.Errorf("ParseForDel header %+v, want %+v", h, tc.want)
			}
		})
	}
}
