// Package journal is the plugin's append-only record of CNI calls: one small
// line per call (time, command, network, result code, duration), written with
// a single O_APPEND write and no fsync, so recording costs the plugin tens of
// microseconds and nothing is lost while the node agent is down. The agent
// drains it (Drain) on each scrape and folds the records into counters.
//
// Compaction is a rename: the agent renames the live file aside, waits for the
// writers that opened the old file to finish (they hold a shared flock while
// they write), reads it and removes it. A writer checks, under its shared
// lock, that the file it opened is still the live one, and reopens otherwise,
// so a record appended during compaction lands either in the drained file
// before it is read or in the new live file: never in a file nobody reads.
//
// This package must stay free of the Prometheus client: the plugin links it.
package journal

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/qoscni/qoscni/internal/flock"
	"github.com/qoscni/qoscni/internal/paths"
)

const (
	// DefaultDir is the journal directory when the plugin's stateDir is the
	// default: the journal is its sibling.
	DefaultDir = paths.JournalDir

	liveName     = "ops.log"
	drainingName = "ops.log.draining"

	// version is the first field of every line, bumped on a format change.
	version = "1"
	// maxNetwork bounds a line well below PIPE_BUF so one write(2) stays small.
	maxNetwork = 200
	// ResultOther is the code recorded for a failure that is not a CNI error.
	ResultOther = 999
)

// DirFor returns the journal directory for a plugin state directory: its
// sibling "journal", so tests with temporary state dirs get their own.
func DirFor(stateDir string) string {
	if !filepath.IsAbs(stateDir) {
		// The plugin rejects such a config; its call is still recorded.
		stateDir = paths.StateDir
	}
	return paths.JournalDirOf(stateDir)
}

// Record is one plugin call.
type Record struct {
	Time     time.Time
	Command  string // ADD, DEL, CHECK, GC, STATUS
	Network  string
	Code     int // 0 on success, the CNI error code otherwise (ResultOther if none)
	Duration time.Duration
}

// OK reports whether the call succeeded.
func (r Record) OK() bool { return r.Code == 0 }

func clean(s string, max int) string {
	if len(s) > max {
		s = s[:max]
	}
	if strings.ContainsAny(s, "\t\n\r") {
		s = strings.Map(func(r rune) rune {
			if r == '\t' || r == '\n' || r == '\r' {
				return '_'
			}
			return r
		}, s)
	}
	return s
}

// appendLine encodes r as "1 \t unixnano \t command \t code \t durationns \t network \n".
func appendLine(b []byte, r Record) []byte {
	b = append(b, version...)
	b = append(b, '\t')
	b = strconv.AppendInt(b, r.Time.UnixNano(), 10)
	b = append(b, '\t')
	b = append(b, clean(r.Command, 16)...)
	b = append(b, '\t')
	b = strconv.AppendInt(b, int64(r.Code), 10)
	b = append(b, '\t')
	b = strconv.AppendInt(b, int64(r.Duration), 10)
	b = append(b, '\t')
	b = append(b, clean(r.Network, maxNetwork)...)
	return append(b, '\n')
}

func parseLine(line []byte) (Record, bool) {
	f := strings.Split(string(line), "\t")
	if len(f) != 6 || f[0] != version {
		return Record{}, false
	}
	ns, err1 := strconv.ParseInt(f[1], 10, 64)
	code, err2 := strconv.Atoi(f[3])
	dur, err3 := strconv.ParseInt(f[4], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return Record{}, false
	}
	return Record{Time: time.Unix(0, ns), Command: f[2], Network: f[5], Code: code, Duration: time.Duration(dur)}, true
}

// Append writes one record to the journal in dir with a single write(2),
// creating the directory (0700) and the file (0600) when missing.
func Append(dir string, r Record) error {
	line := appendLine(make([]byte, 0, 128), r)
	path := filepath.Join(dir, liveName)
	// A retry happens only when a drain rotated the file between our open and
	// our lock; the agent drains once per scrape, so one retry is the norm and
	// the bound only guards against a pathological loop.
	for attempt := 0; attempt < 64; attempt++ {
		fd, err := unix.Open(path, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, unix.ENOENT) {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return fmt.Errorf("journal: create %s: %w", dir, err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("journal: open %s: %w", path, err)
		}
		live, err := lockLive(fd, path)
		if err != nil || !live {
			unix.Close(fd)
			if err != nil {
				return err
			}
			continue
		}
		_, err = unix.Write(fd, line)
		unix.Close(fd) // also releases the shared lock
		if err != nil {
			return fmt.Errorf("journal: write %s: %w", path, err)
		}
		return nil
	}
	return fmt.Errorf("journal: %s kept moving during append", path)
}

// lockLive takes the shared lock and checks fd is still the file at path.
func lockLive(fd int, path string) (bool, error) {
	if err := flock.Wait(fd, unix.LOCK_SH); err != nil {
		return false, fmt.Errorf("journal: lock %s: %w", path, err)
	}
	var a, b unix.Stat_t
	if err := unix.Fstat(fd, &a); err != nil {
		return false, fmt.Errorf("journal: stat %s: %w", path, err)
	}
	if err := unix.Stat(path, &b); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("journal: stat %s: %w", path, err)
	}
	return a.Ino == b.Ino && a.Dev == b.Dev, nil
}

// Drain moves every record written so far out of the journal in dir and
// returns them, plus the number of lines it could not parse. A record is
// returned by exactly one Drain (unless the caller crashes between reading
// and removing the drained file, in which case the next Drain returns it
// again). Drain must not run concurrently with itself on one dir.
func Drain(dir string) ([]Record, int, error) {
	live := filepath.Join(dir, liveName)
	draining := filepath.Join(dir, drainingName)
	var out []Record
	bad := 0
	// A draining file left by a crash is read first; then the live one.
	for _, step := range []bool{false, true} {
		if step {
			if err := os.Rename(live, draining); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return out, bad, nil
				}
				return out, bad, fmt.Errorf("journal: rotate %s: %w", live, err)
			}
		}
		recs, n, err := drainFile(draining)
		out = append(out, recs...)
		bad += n
		if err != nil {
			return out, bad, err
		}
	}
	return out, bad, nil
}

func drainFile(path string) ([]Record, int, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("journal: open %s: %w", path, err)
	}
	defer f.Close()
	// Writers that opened this inode before the rename hold LOCK_SH while they
	// write; once we hold LOCK_EX they are done, and later ones see the inode
	// is no longer live and reopen. So the content is final from here.
	if err := flock.Wait(int(f.Fd()), unix.LOCK_EX); err != nil {
		return nil, 0, fmt.Errorf("journal: lock %s: %w", path, err)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, 0, fmt.Errorf("journal: read %s: %w", path, err)
	}
	recs, bad := Parse(data)
	if err := os.Remove(path); err != nil {
		return recs, bad, fmt.Errorf("journal: remove %s: %w", path, err)
	}
	return recs, bad, nil
}

// Parse decodes journal lines; a torn last line (no newline) counts as bad.
func Parse(data []byte) ([]Record, int) {
	var recs []Record
	bad := 0
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			bad++
			break
		}
		if r, ok := parseLine(data[:i]); ok {
			recs = append(recs, r)
		} else if i > 0 {
			bad++
		}
		data = data[i+1:]
	}
	return recs, bad
}

// Network is what a call is filed under: the network's name, and its
// stateDir, beside which the journal lives (DirFor). The plugin takes both
// from its one parse of stdin, as far as it could read them: a call whose
// config it refused is still a call.
type Network struct {
	Name     string
	StateDir string
}

// Cmd is a CNI command that also says which network its config named.
type Cmd func(*skel.CmdArgs) (Network, error)

// Funcs are the plugin's commands, as Wrap takes them.
type Funcs struct {
	Add, Del, Check, GC, Status Cmd
}

// Wrap returns skel's funcs whose every call is recorded in the journal
// next to the network's stateDir. Recording never changes the call's
// outcome: a journal that cannot be written is ignored, as the plugin's
// result matters more than its statistics.
func Wrap(funcs Funcs) skel.CNIFuncs {
	wrap := func(cmd string, f Cmd) func(*skel.CmdArgs) error {
		if f == nil {
			return nil
		}
		return func(args *skel.CmdArgs) error {
			start := time.Now()
			n, err := f(args)
			_ = RecordCall(n, cmd, start, err)
			return err
		}
	}
	return skel.CNIFuncs{
		Add:    wrap("ADD", funcs.Add),
		Del:    wrap("DEL", funcs.Del),
		Check:  wrap("CHECK", funcs.Check),
		GC:     wrap("GC", funcs.GC),
		Status: wrap("STATUS", funcs.Status),
	}
}

// RecordCall appends the outcome of one call for network n.
func RecordCall(n Network, command string, start time.Time, callErr error) error {
	d := time.Since(start)
	return Append(DirFor(n.StateDir), Record{Time: start, Command: command, Network: n.Name, Code: Code(callErr), Duration: d})
}

// Code maps a call's error to the recorded result code.
func Code(err error) int {
	if err == nil {
		return 0
	}
	var e *types.Error
	if errors.As(err, &e) && e.Code != 0 {
		return int(e.Code)
	}
	return ResultOther
}
