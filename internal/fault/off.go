//go:build !faultinject

package fault

// Enabled says this binary has the hook.
const Enabled = false

// At does nothing in a release build.
func At(op, step string) {}
