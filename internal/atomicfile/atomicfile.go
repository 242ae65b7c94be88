// Package atomicfile puts files in place so that a reader sees the old
// content or the new, never a part: the data goes to a temporary file in
// the same directory, which is then renamed (or linked) over the target.
// Unless told otherwise it is also durable: the temporary file is fsynced
// before the rename and the directory after it, so a machine crash keeps
// the old content or the new as well.
//
// It uses system calls directly rather than os.File: the plugin writes
// records and IPAM reservations on every pod start, and on tmpfs the
// poller registration of an os.File costs more than the I/O itself.
package atomicfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// TempPrefix starts the name of every temporary file this package makes.
// The names start with a dot and end in random hex digits, never in a
// suffix such as .json or .conf, so directory readers that filter on
// either skip them; a cleaner of crash leftovers can match the prefix.
const TempPrefix = ".tmp-"

// Options say how a file is put in place.
type Options struct {
	// Perm is the new file's mode, exactly (the umask does not apply).
	Perm fs.FileMode
	// Volatile skips the fsyncs of the file and of its directory: a
	// reader still sees the old content or the new, but a machine crash
	// may lose the change. For caches, and for files that describe what
	// a crash takes with it anyway (kernel objects).
	Volatile bool
	// Exclusive publishes with link(2) instead of rename(2): when the
	// target exists, nothing changes and the error wraps fs.ErrExist, so
	// of concurrent writers the first one wins.
	Exclusive bool
	// IfChanged compares first: when the target is a regular file that
	// holds the data with mode Perm already, nothing is written and the
	// call reports false.
	IfChanged bool
}

// Write puts data at path. It reports whether it wrote: false only when
// IfChanged found the content in place.
func Write(path string, data []byte, o Options) (bool, error) {
	if o.IfChanged {
		same, err := holds(path, bytes.NewReader(data), int64(len(data)), o.Perm)
		if err != nil || same {
			return false, err
		}
	}
	return true, put(path, o, func(fd int) error { return writeAll(fd, data) })
}

// Copy is Write for a stream of known size, such as a binary that need
// not be held in memory.
func Copy(path string, src io.ReadSeeker, size int64, o Options) (bool, error) {
	if o.IfChanged {
		same, err := holds(path, src, size, o.Perm)
		if err != nil || same {
			return false, err
		}
	}
	if _, err := src.Seek(0, io.SeekStart); err != nil {
		return false, err
	}
	return true, put(path, o, func(fd int) error { return copyTo(fd, src) })
}

// Temp writes data to a new temporary file in dir (fsynced unless
// Volatile) and returns its path, for a caller that publishes it itself,
// under one name or several (link(2)), and removes it after.
func Temp(dir string, data []byte, o Options) (string, error) {
	tmp, err := writeTemp(dir, "", o, func(fd int) error { return writeAll(fd, data) })
	if err != nil {
		return "", err
	}
	return tmp, nil
}

// Rename moves from to to and makes the move survive a crash.
func Rename(from, to string) error {
	if err := unix.Rename(from, to); err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return SyncDir(filepath.Dir(to))
}

// Remove deletes path and makes the removal survive a crash; false when
// there was nothing to delete.
func Remove(path string) (bool, error) {
	err := os.Remove(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, SyncDir(filepath.Dir(path))
}

// SyncDir makes a rename, link or removal in dir survive a crash.
func SyncDir(dir string) error {
	fd, err := Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return &fs.PathError{Op: "fsync", Path: dir, Err: err}
	}
	return nil
}

// put writes a temporary file beside path with fill and publishes it.
func put(path string, o Options, fill func(fd int) error) error {
	dir := filepath.Dir(path)
	tmp, err := writeTemp(dir, filepath.Base(path), o, fill)
	if err != nil {
		return err
	}
	if o.Exclusive {
		err = unix.Link(tmp, path)
		// The temporary name goes whether the link won or lost.
		unix.Unlink(tmp)
		if err != nil {
			return &os.LinkError{Op: "link", Old: tmp, New: path, Err: err}
		}
	} else if err := unix.Rename(tmp, path); err != nil {
		// unix.Rename, not os.Rename, which first stats the target to
		// refuse directories: the kernel refuses them as well.
		unix.Unlink(tmp)
		return &os.LinkError{Op: "rename", Old: tmp, New: path, Err: err}
	}
	if o.Volatile {
		return nil
	}
	return SyncDir(dir)
}

// writeTemp creates a new file in dir named TempPrefix, base (if any) and
// random hex digits, fills it, sets its mode and, unless o.Volatile,
// fsyncs it. On error nothing is left behind.
func writeTemp(dir, base string, o Options, fill func(fd int) error) (string, error) {
	if base != "" {
		base += "."
	}
	for {
		tmp := filepath.Join(dir, fmt.Sprintf("%s%s%016x", TempPrefix, base, rand.Uint64()))
		fd, err := Open(tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return "", err
		}
		err = fill(fd)
		if err == nil {
			// Explicitly: the mode given to open(2) is cut by the umask.
			err = unix.Fchmod(fd, uint32(o.Perm.Perm()))
		}
		if err == nil && !o.Volatile {
			err = unix.Fsync(fd)
		}
		if cerr := unix.Close(fd); err == nil {
			err = cerr
		}
		if err != nil {
			unix.Unlink(tmp)
			var pe *fs.PathError
			if errors.As(err, &pe) {
				return "", err
			}
			return "", &fs.PathError{Op: "write", Path: tmp, Err: err}
		}
		return tmp, nil
	}
}

// Open is open(2) with O_CLOEXEC, retrying EINTR; errors are
// *fs.PathError, so errors.Is(err, fs.ErrExist) and the like work. Raw
// file descriptors: on the hot path of every pod start, os.File's poller
// registration costs more than the I/O itself on tmpfs.
func Open(path string, flags int, mode uint32) (int, error) {
	for {
		fd, err := unix.Open(path, flags|unix.O_CLOEXEC, mode)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1, &fs.PathError{Op: "open", Path: path, Err: err}
		}
		return fd, nil
	}
}

func writeAll(fd int, data []byte) error {
	for len(data) > 0 {
		n, err := unix.Write(fd, data)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

func copyTo(fd int, src io.Reader) error {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if werr := writeAll(fd, buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// holds says whether path is a regular file with mode perm holding src's
// size bytes.
func holds(path string, src io.ReadSeeker, size int64, perm fs.FileMode) (bool, error) {
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
	if !st.Mode().IsRegular() || st.Size() != size || st.Mode().Perm() != perm.Perm() {
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
