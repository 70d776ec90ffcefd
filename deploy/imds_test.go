package deploy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

func testLogger(t *testing.T) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Output: tWriter{t}, Level: hclog.Debug})
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func TestIdentityFromMetadataMock(t *testing.T) {
	endpoint := startAEMM(t, aemmOptions{
		values: map[string]string{
			"instance-id":                 "i-0abc123def4567890",
			"instance-type":               "g5.xlarge",
			"instance-life-cycle":         "spot",
			"local-ipv4":                  "10.0.1.17",
			"placement-availability-zone": "us-west-2b",
			"placement-region":            "us-west-2",
		},
	})

	// The mock really is IMDSv2-only: a request without a token is refused,
	// so the answers below prove that the client uses session tokens.
	resp, err := http.Get(endpoint + "/latest/meta-data/instance-id")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("IMDSv1 request: status %d, want 401 (mock not in IMDSv2-only mode?)", resp.StatusCode)
	}

	m, err := NewIMDS(IMDSConfig{Endpoint: endpoint})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	id, err := m.Identity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := Identity{
		InstanceID: "i-0abc123def4567890", InstanceType: "g5.xlarge",
		AvailabilityZone: "us-west-2b", Region: "us-west-2", PrivateIP: "10.0.1.17",
		Lifecycle: LifecycleSpot,
	}
	if id != want {
		t.Fatalf("identity = %+v\nwant %+v", id, want)
	}
	if !id.OnEC2() {
		t.Fatal("OnEC2() = false for an identity from IMDS")
	}
}

func TestIdentityDefaultsOnDemand(t *testing.T) {
	endpoint := startAEMM(t, aemmOptions{})
	m, err := NewIMDS(IMDSConfig{Endpoint: endpoint})
	if err != nil {
		t.Fatal(err)
	}
	id, err := m.Identity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The mock's defaults (aemm-metadata-default-values.json).
	if id.InstanceID != "i-1234567890abcdef0" || id.InstanceType != "m4.xlarge" ||
		id.Lifecycle != LifecycleOnDemand || id.Region != "us-east-1" || id.AvailabilityZone != "us-east-1a" {
		t.Fatalf("identity = %+v", id)
	}
}

func TestIdentityNotOnEC2(t *testing.T) {
	t.Run("connection refused", func(t *testing.T) {
		endpoint := "http://127.0.0.1:" + strconv.Itoa(freePort(t))
		checkNotOnEC2(t, endpoint)
	})
	t.Run("black hole", func(t *testing.T) {
		// Accepts connections and never answers, like a firewall that drops.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		done := make(chan struct{})
		defer close(done)
		go func() {
			var conns []net.Conn
			defer func() {
				for _, c := range conns {
					c.Close()
				}
			}()
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				conns = append(conns, c)
			}
		}()
		checkNotOnEC2(t, "http://"+l.Addr().String())
	})
}

func checkNotOnEC2(t *testing.T, endpoint string) {
	t.Helper()
	m, err := NewIMDS(IMDSConfig{Endpoint: endpoint, ProbeTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	start := time.Now()
	id, err := m.Identity(context.Background())
	elapsed := time.Since(start)
	if !errors.Is(err, ErrNotOnEC2) {
		t.Fatalf("err = %v, want ErrNotOnEC2", err)
	}
	if id != UnknownIdentity() || id.OnEC2() || id.Lifecycle != LifecycleUnknown {
		t.Fatalf("identity = %+v, want UnknownIdentity()", id)
	}
	// Not a speed assertion: the probe must be bounded by its timeout and
	// never hang startup. 10 s is far beyond the 300 ms probe.
	if elapsed > 10*time.Second {
		t.Fatalf("Identity took %s off EC2; the probe timeout is 300ms", elapsed)
	}
}

func TestIMDSConfigValidate(t *testing.T) {
	for _, c := range []IMDSConfig{
		{Endpoint: "169.254.169.254", ProbeTimeout: time.Second, RequestTimeout: time.Second},
		{Endpoint: "ftp://x", ProbeTimeout: time.Second, RequestTimeout: time.Second},
		{Endpoint: DefaultIMDSEndpoint, ProbeTimeout: -1, RequestTimeout: time.Second},
		{Endpoint: DefaultIMDSEndpoint, ProbeTimeout: time.Second, RequestTimeout: -1},
		{Endpoint: DefaultIMDSEndpoint, ProbeTimeout: time.Second, RequestTimeout: time.Second, SourceAddr: "nope"},
	} {
		if err := c.Validate(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("Validate(%+v) = %v, want ErrInvalidConfig", c, err)
		}
	}
	if err := DefaultIMDSConfig().Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestParseLifecycleAndRegion(t *testing.T) {
	for in, want := range map[string]Lifecycle{"spot": LifecycleSpot, "on-demand": LifecycleOnDemand,
		"capacity-block": LifecycleOnDemand, "": LifecycleUnknown, "weird": LifecycleUnknown} {
		if got := ParseLifecycle(in); got != want {
			t.Errorf("ParseLifecycle(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[string]string{"us-east-1a": "us-east-1", "eu-central-2c": "eu-central-2",
		"us-west-2-lax-1a": "", "": "", "x": ""} {
		if got := regionFromAZ(in); got != want {
			t.Errorf("regionFromAZ(%q) = %q, want %q", in, got, want)
		}
	}
}
