package node

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// benchCluster starts a 3-node dev cluster with sec on every agent.
func benchCluster(b *testing.B, sec func(name string) SecurityConfig) *DevCluster {
	b.Helper()
	dc, err := NewDevCluster(DevConfig{Nodes: 3, DataDir: b.TempDir(), Logger: hclog.NewNullLogger(),
		Configure: func(i int, c *Config) {
			if sec != nil {
				c.Security = sec(c.NodeName)
			}
		}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(dc.Shutdown)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := dc.WaitReady(ctx); err != nil {
		b.Fatal(err)
	}
	return dc
}

// pendingSpec never fits a dev cluster (no GPUs), so it stays pending and
// starts no process.
func pendingSpec(b *testing.B) *pb.JobSpec {
	s, err := jobspec.Parse([]byte("name: waits\nranks: 2\ngpus_per_rank: 8\nexec:\n  command: [\"true\"]\n"))
	if err != nil {
		b.Fatal(err)
	}
	return s
}

func submitMany(b *testing.B, c pb.ControlClient, ctx context.Context, n, workers int) {
	b.Helper()
	spec := pendingSpec(b)
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				if _, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec}); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		b.Fatal(err)
	}
}

func benchDial(b *testing.B, addr string, sec *SecurityConfig) pb.ControlClient {
	creds := insecure.NewCredentials()
	if sec != nil {
		cfg, _, err := TLSFiles(sec.CAFile, sec.CertFile, sec.KeyFile, "")
		if err != nil {
			b.Fatal(err)
		}
		creds = credentials.NewTLS(cfg)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return pb.NewControlClient(conn)
}

// BenchmarkOpsScrape measures one /metrics scrape of the leader holding
// 1,000 pending jobs.
func BenchmarkOpsScrape(b *testing.B) {
	dc := benchCluster(b, nil)
	l := dc.Leader()
	submitMany(b, benchDial(b, l.RPCAddr(), nil), context.Background(), 1000, 32)
	url := "http://" + l.HTTPAddr() + "/metrics"
	b.ResetTimer()
	var size int
	for i := 0; i < b.N; i++ {
		resp, err := http.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		size = len(body)
	}
	b.ReportMetric(float64(size), "bytes/scrape")
}

// BenchmarkOpsDashboardBuild measures building the dashboard view (no
// cache) on a follower with 1,000 pending jobs.
func BenchmarkOpsDashboardBuild(b *testing.B) {
	dc := benchCluster(b, nil)
	l := dc.Leader()
	submitMany(b, benchDial(b, l.RPCAddr(), nil), context.Background(), 1000, 32)
	var f *Agent
	for _, a := range dc.Agents {
		if !a.IsLeader() {
			f = a
		}
	}
	o := f.ops
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		v := o.dashboard(context.Background())
		if len(v.Jobs) != dashMaxJobs {
			b.Fatalf("%d jobs in the view", len(v.Jobs))
		}
	}
}

// BenchmarkOpsSubmit measures submissions through a follower (forwarded
// to the leader, committed) with plaintext, mutual TLS, and mutual TLS
// with an ACL token; one client, and 32 concurrent ones.
func BenchmarkOpsSubmit(b *testing.B) {
	for _, mode := range []string{"plain", "tls", "tls+token"} {
		for _, workers := range []int{1, 32} {
			b.Run(fmt.Sprintf("%s/clients=%d", mode, workers), func(b *testing.B) {
				var pki map[string]SecurityConfig
				var tokenFile string
				ctx := context.Background()
				if mode != "plain" {
					pki, _ = testPKI(b, "node-1", "node-2", "node-3", "cli")
				}
				if mode == "tls+token" {
					tokenFile = writeToken(b, "bench-token")
					ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer bench-token")
				}
				dc := benchCluster(b, func(name string) SecurityConfig {
					s := pki[name]
					s.ACLTokenFile = tokenFile
					return s
				})
				var f *Agent
				for _, a := range dc.Agents {
					if !a.IsLeader() {
						f = a
					}
				}
				var sec *SecurityConfig
				if pki != nil {
					s := pki["cli"]
					sec = &s
				}
				c := benchDial(b, f.RPCAddr(), sec)
				submitMany(b, c, ctx, 50, workers) // warm up connections
				b.ResetTimer()
				submitMany(b, c, ctx, b.N, workers)
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "submits/s")
			})
		}
	}
}
