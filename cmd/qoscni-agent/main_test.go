package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestCommandLine: a word that names no command (or "help") used to start
// the daemon; now "help" prints the usage and anything unknown is refused
// with status 2, before anything starts.
func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		code       int
		out, inErr string
	}{
		{[]string{"help"}, 0, "usage: qoscni-agent", ""},
		{[]string{"bogus"}, 2, "", `unknown command "bogus"`},
		{[]string{"server"}, 2, "", `unknown command "server"`},
		{[]string{"serve", "extra"}, 2, "", `unexpected argument "extra"`},
		{[]string{"--listen", ":0", "extra"}, 2, "", `unexpected argument "extra"`},
		{[]string{"status", "--no-such-flag"}, 2, "", "no-such-flag"},
		{[]string{"status", "-o", "yaml"}, 2, "", `-o "yaml"`},
		{[]string{"serve", "-h"}, 0, "", "-reconcile-interval"},
		{[]string{"install", "--no-such-flag"}, 2, "", "no-such-flag"},
		{[]string{"serve", "--dra-default-request", "fast"}, 2, "", "-dra-default-request"},
		{[]string{"serve", "--dra-request-step", "0"}, 2, "", "step must be above 0"},
		{[]string{"serve", "--dra-default-request", "1500k"}, 2, "", "not the minimum"},
		{[]string{"serve", "--dra-max-request", "5M"}, 2, "", "below the default"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tc.args, &stdout, &stderr)
		if code != tc.code {
			t.Errorf("%v: exit %d, want %d (stderr %q)", tc.args, code, tc.code, stderr.String())
		}
		if !strings.Contains(stdout.String(), tc.out) || !strings.Contains(stderr.String(), tc.inErr) {
			t.Errorf("%v: stdout %q, stderr %q; want %q and %q", tc.args, stdout.String(), stderr.String(), tc.out, tc.inErr)
		}
	}
}
