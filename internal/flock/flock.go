// Package flock takes flock(2) locks for the plugin's stores. A plugin
// call that waits without bound for a lock a stuck process holds hangs the
// pod's start or teardown with it; Exclusive bounds the wait and answers
// with the CNI error that tells the runtime to try again later.
package flock

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"
)

// Lock is a held lock. The lock lives as long as its descriptor, so a
// process that dies releases it.
type Lock struct{ fd int }

// Unlock releases the lock; on nil it does nothing.
func (l *Lock) Unlock() {
	if l != nil {
		unix.Close(l.fd)
	}
}

// Exclusive opens path (created with mode 0600, never through a symbolic
// link) and takes an exclusive lock on it, polling until timeout (zero or
// negative: one attempt). When another process still holds it then, the
// error is a *types.Error with code types.ErrTryAgainLater saying
// "<what> is locked by another process for <timeout>". Other errors are
// *fs.PathError.
func Exclusive(path string, timeout time.Duration, what string) (*Lock, error) {
	fd, err := open(path)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	backoff := 200 * time.Microsecond
	for {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		switch {
		case err == nil:
			return &Lock{fd}, nil
		case errors.Is(err, unix.EINTR):
			continue
		case !errors.Is(err, unix.EWOULDBLOCK):
			unix.Close(fd)
			return nil, &fs.PathError{Op: "flock", Path: path, Err: err}
		}
		left := time.Until(deadline)
		if left <= 0 {
			unix.Close(fd)
			return nil, types.NewError(types.ErrTryAgainLater,
				fmt.Sprintf("%s is locked by another process for %s", what, timeout), "")
		}
		// Polling rather than a blocking flock: the wait can end on time.
		// Jitter keeps many waiting plugin processes from polling in
		// lockstep; the backoff caps at 10 ms, well under a pod start.
		time.Sleep(min(backoff/2+rand.N(backoff/2+1), left))
		backoff = min(backoff*2, 10*time.Millisecond)
	}
}

// Wait takes a lock of kind how (unix.LOCK_SH, unix.LOCK_EX) on fd,
// blocking until it is granted; an interrupted wait is resumed. For locks
// whose holders hold them for one system call, never for a whole plugin
// call (the journal's).
func Wait(fd, how int) error {
	for {
		err := unix.Flock(fd, how)
		if err != unix.EINTR {
			return err
		}
	}
}

func open(path string) (int, error) {
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1, &fs.PathError{Op: "open", Path: path, Err: err}
		}
		return fd, nil
	}
}
