package node

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/gpumesh/gpumesh/cuda"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/tlsutil"
)

// fakeGPUs is a GPU sampler for hosts without GPUs: two devices with fixed
// readings, the node's name folded into the UUID.
func fakeGPUs(name string) GPUSampler {
	return func() ([]cuda.GPUMetrics, error) {
		return []cuda.GPUMetrics{
			{Index: 0, UUID: "GPU-" + name + "-0", UtilizationGPU: 42, UtilizationMem: 10, MemoryUsedBytes: 30 << 30, MemoryFreeBytes: 50 << 30,
				TemperatureC: 61, PowerWatts: 350, ECCCorrected: 3, ECCUncorrected: 0},
			{Index: 1, UUID: "GPU-" + name + "-1", UtilizationGPU: 97, UtilizationMem: 55, MemoryUsedBytes: 79 << 30, MemoryFreeBytes: 1 << 30,
				TemperatureC: 83, PowerWatts: 690, ECCCorrected: 0, ECCUncorrected: 1},
		}, nil
	}
}

// startGPUCluster starts 3 agents that report fakeGPUs and returns the
// cluster, a follower and a Control client of that follower.
func startGPUCluster(t *testing.T) (*DevCluster, *Agent, pb.ControlClient) {
	t.Helper()
	dc := startCluster(t, 3, func(i int, c *Config) { c.GPUSampler = fakeGPUs(c.NodeName) })
	f := follower(dc)
	return dc, f, client(t, f)
}

// submitJob submits the job spec y through c and returns the job's ID.
func submitJob(t *testing.T, c pb.ControlClient, y string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, y)})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Id
}

// submitSleeper submits a job "sleeper" of ranks ranks that each sleep 60 s
// and returns its ID.
func submitSleeper(t *testing.T, c pb.ControlClient, ranks int) string {
	t.Helper()
	return submitJob(t, c, fmt.Sprintf(`
name: sleeper
ranks: %d
exec:
  command: ["sh", "-c", "sleep 60"]
`, ranks))
}

// waitRanksRunning waits until job id runs with ranks allocations running.
func waitRanksRunning(t *testing.T, c pb.ControlClient, id string, ranks int) {
	t.Helper()
	waitJob(t, c, id, 30*time.Second, func(r *pb.GetJobResponse) bool {
		n := 0
		for _, al := range r.Allocations {
			if al.ClientStatus == "running" {
				n++
			}
		}
		return r.Job.Status == "running" && n == ranks
	})
}

// scrape reads an agent's /metrics.
func scrape(t *testing.T, a *Agent) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + a.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return mfs
}

// metricValue returns the value of the series of name with labels (a
// subset match), and whether it exists.
func metricValue(mfs map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
outer:
	for _, m := range mf.Metric {
		got := map[string]string{}
		for _, lp := range m.Label {
			got[lp.GetName()] = lp.GetValue()
		}
		for k, v := range labels {
			if got[k] != v {
				continue outer
			}
		}
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %s", url, resp.Status, b)
	}
	return string(b)
}

// testPKI writes a CA and one certificate per name into a new folder and
// returns the SecurityConfig of each name.
func testPKI(t testing.TB, names ...string) (map[string]SecurityConfig, *tlsutil.CA) {
	t.Helper()
	dir := t.TempDir()
	ca, err := tlsutil.NewCA("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	out := map[string]SecurityConfig{}
	for _, n := range names {
		c, k, err := ca.Issue(tlsutil.CertRequest{Name: n})
		if err != nil {
			t.Fatal(err)
		}
		cf, kf := filepath.Join(dir, n+".pem"), filepath.Join(dir, n+"-key.pem")
		if err := os.WriteFile(cf, c, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(kf, k, 0o600); err != nil {
			t.Fatal(err)
		}
		out[n] = SecurityConfig{CAFile: caFile, CertFile: cf, KeyFile: kf}
	}
	return out, ca
}

func writeToken(t testing.TB, token string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func contains(s string, subs ...string) error {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return fmt.Errorf("%q not found", sub)
		}
	}
	return nil
}
