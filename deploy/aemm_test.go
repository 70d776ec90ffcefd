package deploy

import (
	"net"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/deploy/aemmtest"
)

type aemmOptions struct {
	spotDelay      time.Duration
	rebalanceDelay time.Duration
	ipCount        int
	values         map[string]string
}

// startAEMM starts the real ec2-metadata-mock (IMDSv2 only) for this test.
func startAEMM(t *testing.T, o aemmOptions) string {
	t.Helper()
	return aemmtest.Start(t, aemmtest.Options{SpotDelay: o.spotDelay, RebalanceDelay: o.rebalanceDelay, IPCount: o.ipCount, Values: o.values})
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startAEMMB(b *testing.B, spotDelay ...time.Duration) string {
	b.Helper()
	o := aemmtest.Options{}
	if len(spotDelay) > 0 {
		o.SpotDelay = spotDelay[0]
		o.RebalanceDelay = time.Hour
	}
	return aemmtest.Start(b, o)
}
