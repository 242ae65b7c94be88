package paths

import "testing"

func TestDerivedDefaults(t *testing.T) {
	if got := GrantDirOf(RegistryDir); got != GrantDir {
		t.Errorf("GrantDirOf(%s) = %s, want %s", RegistryDir, got, GrantDir)
	}
	if got := JournalDirOf(StateDir); got != JournalDir {
		t.Errorf("JournalDirOf(%s) = %s, want %s", StateDir, got, JournalDir)
	}
	if got, want := LocalnetDirOf("/run/q/state/"), "/run/q/localnet"; got != want {
		t.Errorf("LocalnetDirOf = %s, want %s", got, want)
	}
}
