// Package scripts holds no Go code: its test lints the shell scripts of the
// repository for pipelines that fail at random under `set -o pipefail`.
package scripts

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// A reader that stops before its input ends (grep -q, grep -m, head, awk's
// exit, sed's q) makes the next write of the command before it fail with
// SIGPIPE; under pipefail the whole pipeline then fails although the match
// was found. iproute2 and nft write once per object, so the failure comes
// and goes with the number of objects and the scheduler: the first README
// command failed about half the time on a fresh machine because of one such
// pipeline. Capture the output into a variable and test that instead.
var (
	grepStops = regexp.MustCompile(`^grep\b.*(\s-[a-zA-Z]*[qm]|\s--(quiet|silent|max-count))`)
	headStops = regexp.MustCompile(`^head\b`)
	awkStops  = regexp.MustCompile(`^awk\b.*\bexit\b`)
	sedStops  = regexp.MustCompile(`^sed\b.*([0-9/$]q\b|[;{]\s*q\b|\s-n\s+['"]?[0-9]+\{?p;q)`)
)

// earlyExit returns why a pipeline stage stops reading early, "" if it
// reads its whole input.
func earlyExit(stage string) string {
	s := strings.TrimSpace(stage)
	s = strings.TrimPrefix(s, "command ")
	switch {
	case grepStops.MatchString(s):
		return "grep -q/-m stops at the first match"
	case headStops.MatchString(s):
		return "head stops after its lines"
	case awkStops.MatchString(s):
		return "awk's exit stops reading"
	case sedStops.MatchString(s):
		return "sed's q stops reading"
	}
	return ""
}

// pipelines splits one logical shell line into pipelines, each a list of
// stages, honouring quotes. It is not a shell parser; it only has to be
// right for the scripts of this repository.
func pipelines(line string) [][]string {
	var out [][]string
	var cur []string
	var b strings.Builder
	var quote byte
	flushStage := func() {
		cur = append(cur, b.String())
		b.Reset()
	}
	flushPipe := func() {
		flushStage()
		out = append(out, cur)
		cur = nil
	}
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quote != 0:
			if c == '\\' && quote == '"' && i+1 < len(line) {
				b.WriteByte(c)
				i++
				c = line[i]
			} else if c == quote {
				quote = 0
			}
			b.WriteByte(c)
		case c == '\\' && i+1 < len(line):
			b.WriteByte(c)
			i++
			b.WriteByte(line[i])
		case c == '\'' || c == '"':
			quote = c
			b.WriteByte(c)
		case c == '#' && (i == 0 || line[i-1] == ' ' || line[i-1] == '\t'):
			flushPipe()
			return out
		case c == '|' && i+1 < len(line) && line[i+1] == '|',
			c == '&' && i+1 < len(line) && line[i+1] == '&':
			i++
			flushPipe()
		case c == ';', c == '(', c == ')', c == '`':
			flushPipe()
		case c == '|':
			flushStage()
		default:
			b.WriteByte(c)
		}
	}
	flushPipe()
	return out
}

// logicalLines joins continuation lines (a trailing backslash, pipe or &&)
// and reports each with the number of its first physical line.
func logicalLines(path string) ([]string, []int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	var lines []string
	var nums []int
	var acc strings.Builder
	start, n := 0, 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		n++
		l := sc.Text()
		if acc.Len() == 0 {
			start = n
		}
		t := strings.TrimRight(l, " \t")
		switch {
		case strings.HasSuffix(t, "\\"):
			acc.WriteString(strings.TrimSuffix(t, "\\") + " ")
			continue
		case strings.HasSuffix(t, "|") || strings.HasSuffix(t, "&&"):
			acc.WriteString(t + " ")
			continue
		}
		acc.WriteString(l)
		lines = append(lines, acc.String())
		nums = append(nums, start)
		acc.Reset()
	}
	return lines, nums, sc.Err()
}

// shellScripts lists the repository's shell scripts: *.sh and files whose
// first line names a shell.
func shellScripts(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case ".git", "testdata", "node_modules":
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasSuffix(p, ".sh") {
			out = append(out, p)
			return nil
		}
		if !d.Type().IsRegular() || strings.Contains(d.Name(), ".") {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		head := make([]byte, 64)
		k, _ := f.Read(head)
		if first := string(head[:k]); strings.HasPrefix(first, "#!") &&
			(strings.Contains(first, "bash") || strings.Contains(first, "/sh")) {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestNoEarlyExitReaderInPipelines(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	scripts := shellScripts(t, root)
	// The sweep must see the scripts it is meant for, or it proves nothing.
	for _, want := range []string{"scripts/demo.sh", "scripts/deps.sh", "test/e2e/run.sh", "test/e2e/build.sh", "test/bench/shaping.sh", ".ci/run"} {
		found := false
		for _, s := range scripts {
			if strings.HasSuffix(s, "/"+want) {
				found = true
			}
		}
		if !found {
			t.Fatalf("%s not among the scripts found under %s: %v", want, root, scripts)
		}
	}
	for _, path := range scripts {
		lines, nums, err := logicalLines(path)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, path)
		for i, l := range lines {
			for _, p := range pipelines(l) {
				for _, stage := range p[1:] {
					if why := earlyExit(stage); why != "" {
						t.Errorf("%s:%d: %s, so the command before it may die of SIGPIPE and fail the pipeline under pipefail; capture the output first:\n\t%s",
							rel, nums[i], why, strings.TrimSpace(l))
					}
				}
			}
		}
	}
}

// TestDetector pins what the lint catches and what it lets through.
func TestDetector(t *testing.T) {
	bad := []string{
		`ip netns exec "$NODE" tc qdisc show dev "$veth" | grep -q "rate 10Mbit" && true`,
		`until ip netns exec "$p" ss -ltn 'sport = :80' | grep -q ':80'; do`,
		`x=$(ip -o addr show | awk '{print $4}' | cut -d/ -f1 | head -1)`,
		`gw=$(ip route show default | awk '/via/ {print $3; exit}')`,
		`echo "$body" | grep -Eq 'x'`,
		`nft list ruleset | grep -m1 foo`,
		`tc -s qdisc show | grep --quiet backlog || sleep 1`,
		`ip link | sed -n '1p;q'`,
	}
	for _, l := range bad {
		hit := false
		for _, p := range pipelines(l) {
			for _, s := range p[1:] {
				hit = hit || earlyExit(s) != ""
			}
		}
		if !hit {
			t.Errorf("not caught: %s", l)
		}
	}
	good := []string{
		`out=$(tc qdisc show dev "$veth") && [[ $out == *"rate 10Mbit"* ]]`,
		`ip -o addr show | awk 'NR == 1 { print $4 }'`,
		`grep -q foo file || true`,
		`[ -x "$out" ] || exit 1`,
		`a || head_of_list`,
		`echo "a | head -1"`,
		`grep -E 'u32|mirred' file | sed 's/^/  /'`,
		`cmd | grep -c foo`,
	}
	for _, l := range good {
		for _, p := range pipelines(l) {
			for _, s := range p[1:] {
				if why := earlyExit(s); why != "" {
					t.Errorf("false alarm (%s): %s", why, l)
				}
			}
		}
	}
}
