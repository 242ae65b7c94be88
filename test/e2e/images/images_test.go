package images

import (
	"archive/tar"
	"bufio"
	"bytes"
	"debug/elf"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/qoscni/qoscni/internal/testnet"
)

// binary reads image ref from the docker-archive tarball tarPath, checks
// its entrypoint is /<bin> and that /<bin> is a static ELF executable, and
// writes it to a temporary file whose path it returns.
func binary(t *testing.T, tarPath, ref, bin string) string {
	t.Helper()
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(tarPath, &tag)
	if err != nil {
		t.Fatalf("%s: %v", tarPath, err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || !slices.Equal(cfg.Config.Entrypoint, []string{"/" + bin}) {
		t.Fatalf("%s: os %s entrypoint %q", ref, cfg.OS, cfg.Config.Entrypoint)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("%s: layers %v %v", ref, layers, err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var data []byte
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == bin {
			if h.Typeflag != tar.TypeReg || h.Mode != 0o755 {
				t.Fatalf("%s: /%s type %c mode %o", ref, bin, h.Typeflag, h.Mode)
			}
			data, _ = io.ReadAll(tr)
		}
	}
	if data == nil {
		t.Fatalf("%s: no /%s in the layer", ref, bin)
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("%s: /%s: %v", ref, bin, err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatalf("%s: /%s is dynamically linked (PT_INTERP)", ref, bin)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Fatalf("%s: /%s needs %q", ref, bin, libs)
	}
	p := filepath.Join(t.TempDir(), bin)
	if err := os.WriteFile(p, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBuild(t *testing.T) {
	dir := t.TempDir()
	pause, workload := Build(t, dir)
	if pause != filepath.Join(dir, PauseFile) || workload != filepath.Join(dir, WorkloadFile) {
		t.Fatalf("paths %s %s", pause, workload)
	}
	binary(t, pause, Pause, "pause")
	binary(t, workload, Workload, "workload")

	// A second call (another test's dir) gets the same tarballs.
	p2, _ := Build(t, t.TempDir())
	a, _ := os.ReadFile(pause)
	b, _ := os.ReadFile(p2)
	if !bytes.Equal(a, b) {
		t.Fatal("second Build wrote a different pause tarball")
	}
}

func TestWorkload(t *testing.T) {
	_, workload := Build(t, t.TempDir())
	bin := binary(t, workload, Workload, "workload")
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(bin, "-tcp", "127.0.0.1:0", "-udp", "127.0.0.1:0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			t.Logf("workload: %s", sc.Text())
			lines <- sc.Text()
		}
		close(lines)
		exited <- cmd.Wait()
	}()

	var tcpAddr, udpAddr string
	select {
	case line := <-lines:
		m := regexp.MustCompile(`^workload: hostname (\S+) tcp (\S+) udp (\S+)$`).FindStringSubmatch(line)
		if m == nil || m[1] != host {
			t.Fatalf("start line %q, want hostname %s and the bound addresses", line, host)
		}
		tcpAddr, udpAddr = m[2], m[3]
	case <-time.After(10 * time.Second):
		t.Fatal("no start line from the workload in 10s")
	}

	// TCP: one line naming the host and the client's address, then EOF.
	for range 2 {
		c, err := net.DialTimeout("tcp", tcpAddr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if want := host + " " + c.LocalAddr().String() + "\n"; err != nil || string(got) != want {
			t.Fatalf("tcp: got %q (%v), want %q", got, err, want)
		}
	}

	// UDP: "<hostname> " and the datagram back.
	u, err := net.Dial("udp", udpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	for _, msg := range []string{"ping 1", "x"} {
		if _, err := u.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		n, err := u.Read(buf)
		if want := host + " " + msg; err != nil || string(buf[:n]) != want {
			t.Fatalf("udp: got %q (%v), want %q", buf[:n], err, want)
		}
	}

	// SIGTERM: exit 0, promptly.
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Fatalf("workload after SIGTERM: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("workload still running 5s after SIGTERM")
	}
}

// startPause runs the pause binary, in a new PID namespace if newPID.
func startPause(t *testing.T, bin string, newPID bool) (*exec.Cmd, chan error) {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if newPID {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWPID
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		err := <-exited
		exited <- err
	})
	return cmd, exited
}

func stopPause(t *testing.T, cmd *exec.Cmd, exited chan error, sig syscall.Signal) {
	t.Helper()
	// Give the Go runtime time to install its handlers: before that the
	// signal would kill it with the default action.
	time.Sleep(200 * time.Millisecond)
	cmd.Process.Signal(sig)
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("pause after %v: %v", sig, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("pause still running 5s after %v", sig)
	}
}

func TestPauseSignals(t *testing.T) {
	pause, _ := Build(t, t.TempDir())
	bin := binary(t, pause, Pause, "pause")
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd, exited := startPause(t, bin, false)
		time.Sleep(100 * time.Millisecond)
		select {
		case err := <-exited:
			t.Fatalf("pause exited by itself: %v", err)
		default:
		}
		stopPause(t, cmd, exited, sig)
	}
}

// TestPauseReaps runs pause as PID 1 of a new PID namespace, orphans
// children into that namespace (nsenter's shell exits before them) and
// checks that pause reaps them: no zombie children are left.
func TestPauseReaps(t *testing.T) {
	testnet.RequireRoot(t)
	if _, err := exec.LookPath("nsenter"); err != nil {
		t.Skip("needs nsenter (util-linux)")
	}
	pause, _ := Build(t, t.TempDir())
	bin := binary(t, pause, Pause, "pause")
	cmd, exited := startPause(t, bin, true)
	time.Sleep(200 * time.Millisecond)
	pid := cmd.Process.Pid

	// The sleeps do not hold nsenter's output pipe: CombinedOutput returns
	// as soon as the shell has exited.
	out, err := exec.Command("nsenter", "-t", strconv.Itoa(pid), "-p", "--",
		"sh", "-c", "for i in 1 2 3 4; do sleep 1 >/dev/null 2>&1 & done").CombinedOutput()
	if err != nil {
		t.Fatalf("nsenter: %v\n%s", err, out)
	}
	if kids := children(pid); len(kids) != 4 {
		t.Fatalf("pause's children after the orphaning: %v, want 4 sleeps", kids)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(children(pid)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("pause's children 9s after they exited: %v (zombies: not reaped)", children(pid))
		}
		time.Sleep(50 * time.Millisecond)
	}
	stopPause(t, cmd, exited, syscall.SIGTERM)
}

// children lists "pid state" of the processes whose parent is ppid.
func children(ppid int) []string {
	var kids []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		s := string(data)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			kids = append(kids, e.Name()+" "+f[0])
		}
	}
	return kids
}

// TestCoreDNS checks the CoreDNS image: tagged with the version its binary
// reports, the static binary alone as /coredns, reading its Corefile from
// CoreDNSConfDir; and made once per process.
func TestCoreDNS(t *testing.T) {
	tarPath, ref := CoreDNS(t)
	if !strings.HasPrefix(ref, CoreDNSRepo+":1.") {
		t.Fatalf("reference %q, want %s:1.<minor>.<patch>", ref, CoreDNSRepo)
	}
	bin := binary(t, tarPath, ref, "coredns")
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(tarPath, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"-conf", CoreDNSConfDir + "/Corefile"}; !slices.Equal(cfg.Config.Cmd, want) {
		t.Errorf("cmd %q, want %q", cfg.Config.Cmd, want)
	}
	out, err := exec.Command(bin, "-version").CombinedOutput()
	if want := "CoreDNS-" + strings.TrimPrefix(ref, CoreDNSRepo+":"); err != nil || !strings.HasPrefix(string(out), want+"\n") {
		t.Fatalf("/coredns -version: %v %q, want %s first", err, out, want)
	}
	t.Logf("%s: %s", ref, strings.ReplaceAll(strings.TrimSpace(string(out)), "\n", ", "))

	p2, ref2 := CoreDNS(t)
	a, _ := os.ReadFile(tarPath)
	b, _ := os.ReadFile(p2)
	if ref2 != ref || !bytes.Equal(a, b) {
		t.Fatal("second CoreDNS call gave another image")
	}
}
