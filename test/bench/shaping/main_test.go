package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestTable(t *testing.T) {
	in := "meta\tsetup line\nbaseline\tingress\t5e9\nbaseline\tegress\t8e8\n" +
		"steady\t10000000\t10M\tingress\tqoscni\t1\t9500000\t9600000\n" +
		"steady\t10000000\t10M\tingress\tqoscni\t2\t9400000\t9500000\n" +
		"steady\t10000000\t10M\tingress\tqoscni\t3\tfail\tfail\n" +
		"steady\t10000000\t10M\tingress\tref\t1\t9600000\t900000000\n" +
		"rtt\t10000000\t10M\tingress\tqoscni\t100\t99\t10.5\t20.1\n" +
		"rtt\t10000000\t10M\tingress\tref\t100\t100\t500\t900\n" +
		"steady\t1000000000\t1G\tegress\tqoscni\t1\t7e8\t7e8\n"
	rs, err := ReadResults(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	rs.WriteMarkdown(&b)
	out := b.String()
	for _, want := range []string{
		"| 10M | ingress | qoscni | 0.945 | 2 (+1 failed) | 0.960 | 10.5 ms | 20.1 ms | 1% |",
		"| 10M | ingress | ref | 0.960 | 1 | 90.0 |",
		"| 10M | ingress | 0.945 | 0.960 | 0.960 | 90.0 | 20.1 ms (1% unanswered) | 900 ms | met |",
		"not measurable here (unshaped baseline 0.80 Gbit/s)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
