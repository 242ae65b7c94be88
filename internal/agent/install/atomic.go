package install

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/qoscni/qoscni/internal/atomicfile"
)

// writeAtomic makes path hold data with mode perm and reports whether it
// had to change anything. A reader (the kubelet executing the plugin, the
// runtime loading a conflist) sees the old file or the new one, never a
// part, and atomicfile's temporary names do not end in
// .conf/.conflist/.json, so the runtime never loads one. Durable: install
// and uninstall leave the node as they say, also across a crash.
func writeAtomic(path string, data []byte, perm fs.FileMode) (bool, error) {
	return copyAtomic(path, bytes.NewReader(data), int64(len(data)), perm)
}

// copyAtomic is writeAtomic for a stream of known size (the plugin binary:
// compared and copied without holding it in memory).
func copyAtomic(path string, src io.ReadSeeker, size int64, perm fs.FileMode) (bool, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, fmt.Errorf("create %s: %w", dir, err)
	}
	return atomicfile.Copy(path, src, size, atomicfile.Options{Perm: perm, IfChanged: true})
}

// renameAtomic moves from to to and makes the move durable.
func renameAtomic(from, to string) error { return atomicfile.Rename(from, to) }

// removeFile deletes path durably; false when there was nothing to delete.
func removeFile(path string) (bool, error) { return atomicfile.Remove(path) }
