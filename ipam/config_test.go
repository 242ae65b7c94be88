package ipam

import (
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

func decode(t *testing.T, js string) *Config {
	t.Helper()
	var c Config
	if err := json.Unmarshal([]byte(js), &c); err != nil {
		t.Fatalf("decode %s: %v", js, err)
	}
	return &c
}

func TestValidateDefaults(t *testing.T) {
	c := decode(t, `{"type":"qoscni","ranges":[[{"subnet":"10.22.0.0/24"}],[{"subnet":"fd00:22::/64"}]]}`)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.DataDir != DefaultDataDir {
		t.Errorf("dataDir = %q", c.DataDir)
	}
	want := []struct{ subnet, start, end, gw string }{
		{"10.22.0.0/24", "10.22.0.1", "10.22.0.254", "10.22.0.1"},
		{"fd00:22::/64", "fd00:22::1", "fd00:22::ffff:ffff:ffff:ffff", "fd00:22::1"},
	}
	for i, w := range want {
		r := c.Ranges[i][0]
		got := []string{(*net.IPNet)(&r.Subnet).String(), r.RangeStart.String(), r.RangeEnd.String(), r.Gateway.String()}
		if strings.Join(got, " ") != strings.Join([]string{w.subnet, w.start, w.end, w.gw}, " ") {
			t.Errorf("set %d = %v, want %+v", i, got, w)
		}
	}
	if len(c.Ranges[0][0].RangeStart) != net.IPv4len {
		t.Errorf("IPv4 rangeStart not in 4-byte form: %d bytes", len(c.Ranges[0][0].RangeStart))
	}
	// Idempotent.
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestValidateLegacyKeys(t *testing.T) {
	c := decode(t, `{"subnet":"10.1.0.0/16","rangeStart":"10.1.5.0","gateway":"10.1.0.254",
		"ranges":[[{"subnet":"fd01::/120"}]]}`)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(c.Ranges) != 2 || c.Ranges[0][0].RangeStart.String() != "10.1.5.0" ||
		c.Ranges[0][0].Gateway.String() != "10.1.0.254" || c.Ranges[0][0].RangeEnd.String() != "10.1.255.254" {
		t.Fatalf("legacy range not folded in: %+v", c.Ranges)
	}
	bad := decode(t, `{"subnet":"10.1.0.0/16","rangeEnd":"10.2.0.9"}`)
	checkInvalid(t, bad.Validate(), "ipam.rangeEnd: 10.2.0.9 is outside subnet 10.1.0.0/16")
}

func checkInvalid(t *testing.T, err error, want string) {
	t.Helper()
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("error %v is not a *types.Error", err)
	}
	if te.Code != types.ErrInvalidNetworkConfig {
		t.Errorf("code = %d, want %d", te.Code, types.ErrInvalidNetworkConfig)
	}
	if !strings.Contains(te.Msg, want) {
		t.Errorf("message %q does not contain %q", te.Msg, want)
	}
}

func TestValidateErrors(t *testing.T) {
	for _, tc := range []struct{ name, js, want string }{
		{"no ranges", `{}`, "ipam.ranges: at least one range set is required"},
		{"empty set", `{"ranges":[[]]}`, "ipam.ranges[0]: range set is empty"},
		{"missing subnet", `{"ranges":[[{"rangeStart":"10.0.0.1"}]]}`, "ipam.ranges[0][0].subnet: missing"},
		{"host bits", `{"ranges":[[{"subnet":"10.22.0.5/24"}]]}`, "ipam.ranges[0][0].subnet: 10.22.0.5/24 has host bits set (network is 10.22.0.0/24)"},
		{"too small v4", `{"ranges":[[{"subnet":"10.22.0.0/31"}]]}`, "ipam.ranges[0][0].subnet: 10.22.0.0/31 is too small"},
		{"too small v6", `{"ranges":[[{"subnet":"fd00::/127"}]]}`, "ipam.ranges[0][0].subnet: fd00::/127 is too small"},
		{"start outside", `{"ranges":[[{"subnet":"10.22.0.0/24"}],[{"subnet":"10.23.0.0/24","rangeStart":"10.9.0.5"}]]}`,
			"ipam.ranges[1][0].rangeStart: 10.9.0.5 is outside subnet 10.23.0.0/24"},
		{"end outside", `{"ranges":[[{"subnet":"10.22.0.0/24","rangeEnd":"10.22.1.0"}]]}`, "ipam.ranges[0][0].rangeEnd: 10.22.1.0 is outside subnet 10.22.0.0/24"},
		{"gateway outside", `{"ranges":[[{"subnet":"10.22.0.0/24","gateway":"10.0.0.1"}]]}`, "ipam.ranges[0][0].gateway: 10.0.0.1 is outside subnet 10.22.0.0/24"},
		{"gateway other family", `{"ranges":[[{"subnet":"10.22.0.0/24","gateway":"fd00::1"}]]}`, "ipam.ranges[0][0].gateway: fd00::1 is outside subnet"},
		{"start after end", `{"ranges":[[{"subnet":"10.22.0.0/24","rangeStart":"10.22.0.100","rangeEnd":"10.22.0.50"}]]}`,
			"ipam.ranges[0][0].rangeStart: 10.22.0.100 is after rangeEnd 10.22.0.50"},
		{"mixed family", `{"ranges":[[{"subnet":"10.22.0.0/24"},{"subnet":"fd00::/64"}]]}`,
			"ipam.ranges[0][1].subnet: fd00::/64 is IPv6 but ipam.ranges[0][0].subnet is IPv4"},
		{"overlap across sets", `{"ranges":[[{"subnet":"10.22.0.0/24"}],[{"subnet":"10.22.0.0/25"}]]}`,
			"ipam.ranges[1][0]: 10.22.0.1-10.22.0.126 overlaps ipam.ranges[0][0] (10.22.0.1-10.22.0.254)"},
		{"overlap in set", `{"ranges":[[{"subnet":"10.22.0.0/24","rangeEnd":"10.22.0.100"},{"subnet":"10.22.0.0/24","rangeStart":"10.22.0.100"}]]}`,
			"ipam.ranges[0][1]: 10.22.0.100-10.22.0.254 overlaps ipam.ranges[0][0]"},
		{"overlap with legacy", `{"subnet":"10.22.0.0/24","ranges":[[{"subnet":"10.22.0.0/16"}]]}`,
			"ipam.ranges[1][0]: 10.22.0.1-10.22.255.254 overlaps ipam.subnet (10.22.0.1-10.22.0.254)"},
		{"legacy orphan", `{"rangeStart":"10.0.0.1","ranges":[[{"subnet":"10.0.0.0/24"}]]}`, "ipam.rangeStart: set without ipam.subnet"},
		{"wrong type", `{"type":"host-local","ranges":[[{"subnet":"10.22.0.0/24"}]]}`, `ipam.type: "host-local"`},
		{"relative dataDir", `{"dataDir":"var/x","ranges":[[{"subnet":"10.22.0.0/24"}]]}`, `ipam.dataDir: "var/x" is not an absolute path`},
		{"route without dst", `{"ranges":[[{"subnet":"10.22.0.0/24"}]],"routes":[{"gw":"10.22.0.1"}]}`, "ipam.routes[0].dst: missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkInvalid(t, decode(t, tc.js).Validate(), tc.want)
		})
	}
}

func TestValidateGood(t *testing.T) {
	for _, js := range []string{
		`{"ranges":[[{"subnet":"10.22.0.0/30"}]]}`,
		`{"ranges":[[{"subnet":"fd00::/126"}]]}`,
		`{"type":"qoscni","dataDir":"/run/x","ranges":[[{"subnet":"10.22.0.0/24","rangeEnd":"10.22.0.100"},{"subnet":"10.22.0.0/24","rangeStart":"10.22.0.101"}]],
		  "routes":[{"dst":"0.0.0.0/0"}]}`,
		`{"ranges":[[{"subnet":"10.22.0.0/24"}],[{"subnet":"10.23.0.0/24"}],[{"subnet":"fd00::/64"}]]}`,
		`{"ranges":[[{"subnet":"10.22.0.0/16","rangeStart":"10.22.5.0","rangeEnd":"10.22.5.0","gateway":"10.22.0.254"}]]}`,
	} {
		if err := decode(t, js).Validate(); err != nil {
			t.Errorf("%s: %v", js, err)
		}
	}
}

// TestAssignFamilies: Calico's assign_ipv4/assign_ipv6, which a config
// migrated from Calico carries, are honoured: false leaves out the range
// sets of that family, as strings or JSON booleans.
func TestAssignFamilies(t *testing.T) {
	const sets = `"ranges":[[{"subnet":"10.1.0.0/24"}],[{"subnet":"fd01::/64"}]]`
	for _, tc := range []struct {
		assign string
		want   []string // subnets kept
	}{
		{``, []string{"10.1.0.0/24", "fd01::/64"}},
		{`"assign_ipv4":"true","assign_ipv6":"false",`, []string{"10.1.0.0/24"}},
		{`"assign_ipv4":false,`, []string{"fd01::/64"}},
		{`"assign_ipv6":"TRUE",`, []string{"10.1.0.0/24", "fd01::/64"}},
	} {
		c := decode(t, `{`+tc.assign+sets+`}`)
		if err := c.Validate(); err != nil {
			t.Fatalf("%s: %v", tc.assign, err)
		}
		var got []string
		for _, s := range c.Ranges {
			got = append(got, (*net.IPNet)(&s[0].Subnet).String())
		}
		if strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("%s: kept %v, want %v", tc.assign, got, tc.want)
		}
		if err := c.Validate(); err != nil || len(c.Ranges) != len(tc.want) {
			t.Errorf("%s: Validate is not idempotent: %v, %d sets", tc.assign, err, len(c.Ranges))
		}
	}
	for _, tc := range []struct{ js, want string }{
		{`{"assign_ipv4":"false","assign_ipv6":false,` + sets + `}`, "leave none"},
		{`{"assign_ipv4":"no",` + sets + `}`, `ipam.assign_ipv4: "no"`},
		{`{"assign_ipv6":1,` + sets + `}`, "ipam.assign_ipv6: 1"},
	} {
		err := decode(t, tc.js).Validate()
		var e *types.Error
		if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, tc.want) {
			t.Errorf("%s: want code 7 naming %q, got %v", tc.js, tc.want, err)
		}
	}
}
