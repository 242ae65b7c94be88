package install

import (
	"bytes"
	"errors"
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
// part: the data goes to a temporary file in the same directory, is synced,
// and renamed over path. The temporary name starts with a dot and does not
// end in .conf/.conflist/.json, so the runtime never loads it.
func writeAtomic(path string, data []byte, perm fs.FileMode) (bool, error) {
	return copyAtomic(path, bytes.NewReader(data), int64(len(data)), perm)
}

// copyAtomic is writeAtomic for a stream of known size (the plugin binary:
// compared and copied without holding it in memory).
func copyAtomic(path string, src io.ReadSeeker, size int64, perm fs.FileMode) (bool, error) {
	same, err := sameContent(path, src, size, perm)
	if err != nil {
		return false, err
	}
	if same {
		return false, nil
	}
	if _, err := src.Seek(0, io.SeekStart); err != nil {
		return false, err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, fmt.Errorf("create %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return false, fmt.Errorf("write %s: %w", path, err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := io.Copy(tmp, src); err != nil {
		return false, fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(perm); err != nil {
		return false, fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return false, fmt.Errorf("sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return false, fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return false, fmt.Errorf("rename %s to %s: %w", tmp.Name(), path, err)
	}
	done = true
	return true, syncDir(dir)
}

// sameContent says whether path already holds src's bytes with mode perm.
func sameContent(path string, src io.ReadSeeker, size int64, perm fs.FileMode) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	if !st.Mode().IsRegular() || st.Size() != size || st.Mode().Perm() != perm {
		return false, nil
	}
	if _, err := src.Seek(0, io.SeekStart); err != nil {
		return false, err
	}
	a, b := make([]byte, 64<<10), make([]byte, 64<<10)
	for {
		n, errA := io.ReadFull(src, a)
		m, errB := io.ReadFull(f, b[:n])
		if m != n || !bytes.Equal(a[:n], b[:m]) {
			return false, nil
		}
		if errA == io.EOF || errA == io.ErrUnexpectedEOF {
			return true, nil
		}
		if errA != nil {
			return false, errA
		}
		if errB != nil {
			return false, fmt.Errorf("read %s: %w", path, errB)
		}
	}
}

// renameAtomic moves from to to and makes the move durable.
func renameAtomic(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return syncDir(filepath.Dir(to))
}

// removeFile deletes path; false when there was nothing to delete.
func removeFile(path string) (bool, error) {
	err := os.Remove(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, syncDir(filepath.Dir(path))
}

// syncDir makes a rename or removal in dir survive a crash.
func syncDir(dir string) error { return atomicfile.SyncDir(dir) }
