//go:build reliability

package reliability

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// oneAgent starts a single-agent cluster (it bootstraps alone) and waits
// for it to lead.
func oneAgent(t *testing.T) (*cluster, *agent) {
	c := newCluster(t, clusterOpts{n: 1, extraArgs: []string{"--bootstrap-expect", "1"}})
	return c, c.waitLeader(60*time.Second, nil)
}

// Oversized specs and messages are refused with errors that say what is
// wrong, and the agent keeps working.
func TestOversizedInputRefused(t *testing.T) {
	_, a := oneAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// A spec over the 256 KiB limit, in a message the transport accepts.
	big := execSpec("big")
	big.Exec.Env = map[string]string{"BLOB": strings.Repeat("x", 300<<10)}
	_, err := a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: "big-1", Spec: big})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "job spec too large") {
		t.Errorf("a 300 KiB spec: got %v, want ResourceExhausted naming the spec size limit", err)
	}
	t.Logf("300 KiB spec: %v", err)

	// A message over the server's receive limit (64 MiB of tensor frame).
	huge := execSpec("huge")
	huge.Exec.Env = map[string]string{"BLOB": strings.Repeat("y", 70<<20)}
	_, err = a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: "huge-1", Spec: huge})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "larger than max") {
		t.Errorf("a 70 MiB message: got %v, want ResourceExhausted (message larger than max)", err)
	}
	t.Logf("70 MiB message: %v", err)

	// The CLI refuses an oversized spec file before sending it.
	spec := filepath.Join(t.TempDir(), "big.yaml")
	body := "name: big\ntype: exec\nranks: 1\nexec:\n  command: [\"true\"]\n  env:\n    BLOB: \"" + strings.Repeat("z", 300<<10) + "\"\n"
	if err := os.WriteFile(spec, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := procs.CLI(ctx, t, a.RPCAddr(), "job", "run", "--detach", spec)
	if err == nil || !strings.Contains(stderr, "too large") {
		t.Errorf("gpumesh job run with a 300 KiB spec: err %v, stderr %q; want a failure naming the size limit", err, stderr)
	}
	t.Logf("gpumesh job run, 300 KiB spec file: %v: %s", err, strings.TrimSpace(stderr))

	// Garbage on the wire where a spec field should be is refused too.
	_, err = a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: "bad-1", Spec: &pb.JobSpec{Name: "bad", Type: "exec", Ranks: -3}})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "ranks") {
		t.Errorf("ranks -3: got %v, want InvalidArgument naming ranks", err)
	}

	// Still serving: a normal job is accepted.
	if _, err := a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: "ok-1", Spec: execSpec("ok")}); err != nil {
		t.Fatalf("a normal submission after the oversized ones: %v", err)
	}
	record(t, "oversized-input", map[string]any{"spec_300KiB": "ResourceExhausted", "message_70MiB": "ResourceExhausted", "cli_spec_300KiB": "refused", "still_serving": true})
}

// A client that opens 1,000 connections to the RPC port (idle ones,
// garbage-speaking ones and real gRPC clients) does not take the node
// down: it keeps answering while they are open, and its file descriptors
// and goroutines come back down after they close.
func TestThousandConnections(t *testing.T) {
	_, a := oneAgent(t)
	ctx := context.Background()
	base, err := a.metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const idle, garbage, grpcClients = 500, 250, 250
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < idle+garbage; i++ {
		c, err := net.DialTimeout("tcp", a.RPCAddr(), 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		if i >= idle {
			_, _ = c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x13garbage-not-http2"))
		}
		conns = append(conns, c)
	}
	var gconns []*grpc.ClientConn
	defer func() {
		for _, g := range gconns {
			g.Close()
		}
	}()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var callErrs []error
	for i := 0; i < grpcClients; i++ {
		g, err := grpc.NewClient(a.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		gconns = append(gconns, g)
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if _, err := pb.NewControlClient(g).AgentInfo(cctx, &pb.AgentInfoRequest{}); err != nil {
				mu.Lock()
				callErrs = append(callErrs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(callErrs) > 0 {
		t.Errorf("%d of %d gRPC clients failed while 1,000 connections were open, e.g. %v", len(callErrs), grpcClients, callErrs[0])
	}
	// The node still answers a fresh client and still commits.
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	_, err = a.Client().SubmitJob(sctx, &pb.SubmitJobRequest{Id: "conn-1", Spec: execSpec("conn")})
	cancel()
	if err != nil {
		t.Fatalf("submission with 1,000 connections open: %v", err)
	}
	latency := time.Since(start)
	during, err := a.metrics(ctx)
	if err != nil {
		t.Fatalf("/metrics with 1,000 connections open: %v", err)
	}
	if during["process_open_fds"] < base["process_open_fds"]+float64(idle) {
		t.Errorf("open fds %v with 1,000 connections open (before %v): the connections did not reach the agent", during["process_open_fds"], base["process_open_fds"])
	}
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	for _, g := range gconns {
		g.Close()
	}
	gconns = nil
	var after map[string]float64
	poll.Until(t, 60*time.Second, func() (err error) {
		after, err = a.metrics(ctx)
		if err != nil {
			return err
		}
		if after["process_open_fds"] > base["process_open_fds"]+10 {
			return fmt.Errorf("open fds %v after the connections closed, %v before: leak", after["process_open_fds"], base["process_open_fds"])
		}
		if after["go_goroutines"] > base["go_goroutines"]+20 {
			return fmt.Errorf("goroutines %v after the connections closed, %v before: leak", after["go_goroutines"], base["go_goroutines"])
		}
		return nil
	})
	record(t, "thousand-connections", map[string]any{
		"connections": idle + garbage + grpcClients, "idle": idle, "garbage": garbage, "grpc_clients": grpcClients,
		"grpc_call_errors": len(callErrs), "submit_latency_ms_while_open": latency.Milliseconds(),
		"fds_before": base["process_open_fds"], "fds_during": during["process_open_fds"], "fds_after": after["process_open_fds"],
		"goroutines_before": base["go_goroutines"], "goroutines_during": during["go_goroutines"], "goroutines_after": after["go_goroutines"],
		"rss_mib_before": base["process_resident_memory_bytes"] / (1 << 20), "rss_mib_during": during["process_resident_memory_bytes"] / (1 << 20), "rss_mib_after": after["process_resident_memory_bytes"] / (1 << 20),
	})
}
