package podnet

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// setSysctl writes a value under /proc/sys (path given with '/' separators,
// so interface names containing '.' need no escaping) in the calling
// thread's network namespace, skipping the write when already set.
func setSysctl(path, value string) error {
	full := "/proc/sys/" + path
	cur, err := os.ReadFile(full)
	if err != nil {
		return fmt.Errorf("read sysctl %s: %w", path, err)
	}
	if strings.TrimSpace(string(cur)) == value {
		return nil
	}
	if err := os.WriteFile(full, []byte(value), 0o644); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", path, value, err)
	}
	return nil
}

// setSysctlIfPresent is setSysctl for knobs that exist only when a module
// (br_netfilter) is loaded or IPv6 is enabled.
func setSysctlIfPresent(path, value string) error {
	err := setSysctl(path, value)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}
