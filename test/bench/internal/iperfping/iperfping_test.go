package iperfping

import (
	"math"
	"strings"
	"testing"
)

// A client that sent (ingress): its own intervals are the sender's, the
// receiver's are in server_output_json.
const iperfSent = `{"intervals":[{"sum":{"seconds":1,"bytes":99999999,"bits_per_second":799999992,"omitted":true,"sender":true}}],
"end":{},
"server_output_json":{"intervals":[
 {"sum":{"seconds":1,"bytes":1500000,"bits_per_second":12000000,"omitted":true,"sender":false}},
 {"sum":{"seconds":1,"bytes":1200000,"bits_per_second":9600000,"omitted":false,"sender":false}},
 {"sum":{"seconds":0.5,"bytes":500000,"bits_per_second":8000000,"omitted":false,"sender":false}}]}}`

// A -R client: its own intervals are the receiver's.
const iperfReverse = `{"intervals":[
 {"sum":{"seconds":1,"bytes":250000,"bits_per_second":2000000,"omitted":true,"sender":false}},
 {"sum":{"seconds":2,"bytes":250000,"bits_per_second":1000000,"omitted":false,"sender":false}}],
"end":{}}`

func TestParseIperf(t *testing.T) {
	r, err := ParseIperf(strings.NewReader(iperfSent))
	if err != nil {
		t.Fatal(err)
	}
	if r.FirstSecondBps != 12e6 || math.Abs(r.GoodputBps-1.7e6*8/1.5) > 1 {
		t.Errorf("sent: %+v", r)
	}
	r, err = ParseIperf(strings.NewReader(iperfReverse))
	if err != nil {
		t.Fatal(err)
	}
	if r.FirstSecondBps != 2e6 || r.GoodputBps != 1e6 {
		t.Errorf("reverse: %+v", r)
	}
	if _, err := ParseIperf(strings.NewReader(`{"error":"unable to connect"}`)); err == nil || !strings.Contains(err.Error(), "unable") {
		t.Errorf("error doc: %v", err)
	}
}

// The server's booking of the omit boundary as iperf3 3.12 writes it at
// times: a zero-length interval claiming 2 s.
const iperfMisbooked = `{"intervals":[{"sum":{"start":0,"end":1,"seconds":1,"bytes":9,"bits_per_second":72,"omitted":true,"sender":true}}],
"end":{},
"server_output_json":{"intervals":[
 {"sum":{"start":0,"end":1.000088,"seconds":1.000088,"bytes":2750000,"bits_per_second":22000000,"omitted":true,"sender":false}},
 {"sum":{"start":1.000007,"end":1.000087,"seconds":2.000094,"bytes":1125000,"bits_per_second":4500000,"omitted":false,"sender":false}},
 {"sum":{"start":1.000087,"end":2.000087,"seconds":1,"bytes":2250000,"bits_per_second":18000000,"omitted":false,"sender":false}},
 {"sum":{"start":2.000087,"end":3.000087,"seconds":1,"bytes":2250000,"bits_per_second":18000000,"omitted":false,"sender":false}}]}}`

func TestParseIperfMisbooked(t *testing.T) {
	r, err := ParseIperf(strings.NewReader(iperfMisbooked))
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(r.GoodputBps-18e6) > 1 {
		t.Errorf("goodput %v, want 18e6 (the misbooked interval left out)", r.GoodputBps)
	}
}

func TestParsePing(t *testing.T) {
	out := `PING 10.61.1.2 (10.61.1.2) 56(84) bytes of data.
64 bytes from 10.61.1.2: icmp_seq=1 ttl=64 time=0.050 ms
64 bytes from 10.61.1.2: icmp_seq=2 ttl=64 time=12.5 ms
64 bytes from 10.61.1.2: icmp_seq=2 ttl=64 time=12.6 ms (DUP!)
64 bytes from 10.61.1.2: icmp_seq=4 ttl=64 time=3.00 ms

--- 10.61.1.2 ping statistics ---
4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 150ms
`
	p, err := ParsePing(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if p.Sent != 4 || p.Received != 3 || len(p.RTTms) != 3 {
		t.Fatalf("%+v", p)
	}
	if p.Percentile(0.5) != 3 || p.Percentile(0.99) != 12.5 {
		t.Errorf("p50 %v p99 %v", p.Percentile(0.5), p.Percentile(0.99))
	}
	if !math.IsNaN((PingResult{}).Percentile(0.5)) {
		t.Error("empty sample must give NaN")
	}
}
