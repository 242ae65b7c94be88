package controls

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// TestRefuseFlowtables: controls are refused with CNI error 7 naming the
// flowtable when the node has one (its flows would skip them), and a
// failed listing is an error of its own, not a refusal. The kernels the
// project runs on cannot make a flowtable, so the listing is given here;
// internal/nfraw TestParseFlowtables decodes the kernel's replies.
func TestRefuseFlowtables(t *testing.T) {
	if err := refuseFlowtables(func() ([]string, error) { return nil, nil }); err != nil {
		t.Errorf("no flowtable: %v", err)
	}
	err := refuseFlowtables(func() ([]string, error) { return []string{"filter/ft"}, nil })
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "filter/ft") || !strings.Contains(e.Msg, "remove the flowtable") {
		t.Errorf("with a flowtable: %v, want CNI error 7 naming filter/ft", err)
	}
	err = refuseFlowtables(func() ([]string, error) { return nil, errors.New("EPERM") })
	if err == nil || errors.As(err, &e) {
		t.Errorf("listing failed: %v, want a plain error", err)
	}
}
