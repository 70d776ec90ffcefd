package deploy

import (
	"testing"

	"go.uber.org/goleak"
)

// Every watcher, autoscaler and mock process started by a test is stopped
// by it. Idle keep-alive connections of HTTP clients are not ours to close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
	)
}
