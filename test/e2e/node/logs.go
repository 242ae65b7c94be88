package node

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// LogDirEnv names a directory where the logs of the processes a failed
// test started (etcd, kube-apiserver, kubelet, containerd...) are copied,
// since the test's temp dir is removed with everything in it. test/e2e/run.sh
// sets it.
const LogDirEnv = "QOSCNI_E2E_LOGDIR"

// KeepLog copies path to $QOSCNI_E2E_LOGDIR/<test>/ when the test failed
// and the variable is set; it logs where.
func KeepLog(t testing.TB, path string) {
	dir := os.Getenv(LogDirEnv)
	if dir == "" || !t.Failed() {
		return
	}
	dst := filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_"), filepath.Base(path))
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return
	}
	in, err := os.Open(path)
	if err != nil {
		return
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err == nil {
		t.Logf("kept %s as %s", path, dst)
	}
}
