package node

import (
	"strings"
	"testing"
)

// Agents sharing a machine get distinct default names; one agent per
// machine keeps the host name.
func TestDefaultNodeName(t *testing.T) {
	for _, tc := range []struct {
		host, bind string
		port       int
		want       string
	}{
		{"devbox", "0.0.0.0", DefaultGossipPort, "devbox"},
		{"ip-10-0-1-17", "10.0.1.17", DefaultGossipPort, "ip-10-0-1-17"},
		{"devbox", "127.0.0.2", DefaultGossipPort, "devbox-127.0.0.2"},
		{"devbox", "127.0.0.3", DefaultGossipPort, "devbox-127.0.0.3"},
		{"devbox", "127.0.0.1", 8946, "devbox-127.0.0.1-8946"},
		{"devbox", "0.0.0.0", 8946, "devbox-8946"},
		{"devbox", "::1", DefaultGossipPort, "devbox-::1"},
		{"", "0.0.0.0", DefaultGossipPort, "gpumesh"},
	} {
		if got := DefaultNodeName(tc.host, tc.bind, tc.port); got != tc.want {
			t.Errorf("DefaultNodeName(%q, %q, %d) = %q, want %q", tc.host, tc.bind, tc.port, got, tc.want)
		}
	}
	long := DefaultNodeName(strings.Repeat("h", 64), "127.0.0.2", 8946)
	if len(long) != 64 || !strings.HasSuffix(long, "-127.0.0.2-8946") {
		t.Errorf("a 64-byte host name: %q (%d bytes), want 64 bytes ending in the address", long, len(long))
	}
}
