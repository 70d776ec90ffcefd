package node

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

func tlsClient(t *testing.T, addr string, sec SecurityConfig) pb.ControlClient {
	t.Helper()
	cfg, _, err := TLSFiles(sec.CAFile, sec.CertFile, sec.KeyFile, "")
	if err != nil {
		t.Fatal(err)
	}
	return dialWith(t, addr, credentials.NewTLS(cfg))
}

func dialWith(t *testing.T, addr string, creds credentials.TransportCredentials) pb.ControlClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewControlClient(conn)
}

// helloSpec spreads its ranks over the three nodes, so that followers'
// status reports must reach the leader through the Control API.
const helloSpec = `
name: hello
ranks: 3
placement: spread
exec:
  command: ["sh", "-c", "echo rank $RANK"]
`

// TestTLSClusterRefusesOtherCA runs a 3-node cluster over mutual TLS
// (Raft, the Control API and forwarding between agents) and checks that a
// node whose certificate comes from another CA can neither join Raft nor
// read, and that neither can a plaintext client.
func TestTLSClusterRefusesOtherCA(t *testing.T) {
	pki, _ := testPKI(t, "node-1", "node-2", "node-3", "cli")
	foreign, _ := testPKI(t, "node-4", "mallory")
	dc := startCluster(t, 3, func(i int, c *Config) {
		c.Security = pki[c.NodeName]
		c.Standbys = 1 // the leader will want the newcomer as a standby
	})
	f := follower(dc)
	c := tlsClient(t, f.RPCAddr(), pki["cli"])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A write through a follower is forwarded to the leader over TLS, and
	// the ranks' status reports travel back the same way.
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, helloSpec)})
	if err != nil {
		t.Fatal(err)
	}
	waitJob(t, c, resp.Id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" })
	// The data plane between agents runs over the same mutual TLS.
	ar, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, `
name: ar
type: allreduce
ranks: 3
placement: spread
allreduce: {sizes: [256KiB], iters: 2, device: cpu}
`)})
	if err != nil {
		t.Fatal(err)
	}
	done := waitJob(t, c, ar.Id, 60*time.Second, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
	if done.Job.Status != "complete" {
		t.Fatalf("all-reduce over TLS: %s (%s)", done.Job.Status, done.Job.StatusReason)
	}
	// Its frames took TCP lanes (which a TLS node only accepts in TLS).
	var lanes uint64
	for _, a := range dc.Agents {
		lanes += a.data.svc.LanesAccepted()
	}
	if lanes == 0 {
		t.Fatal("the all-reduce over TLS used no data-plane lanes")
	}

	// A client with a certificate from another CA, and one without TLS.
	for name, cl := range map[string]pb.ControlClient{
		"other CA":  tlsClient(t, f.RPCAddr(), foreign["mallory"]),
		"plaintext": dialWith(t, f.RPCAddr(), insecure.NewCredentials()),
	} {
		cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := cl.ListJobs(cctx, &pb.ListJobsRequest{Query: &pb.QueryOptions{Stale: true}})
		ccancel()
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("%s client: ListJobs returned %v, want Unavailable (refused at the handshake)", name, err)
		}
	}
	// A client that trusts our CA but has no certificate of its own.
	noCert, _, err := TLSFiles(pki["cli"].CAFile, "", "", "")
	if err != nil {
		t.Fatal(err)
	}
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
	_, err = dialWith(t, f.RPCAddr(), credentials.NewTLS(noCert)).ListJobs(cctx, &pb.ListJobsRequest{})
	ccancel()
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("client without a certificate: ListJobs returned %v, want Unavailable", err)
	}

	// A node from another CA joins gossip (no gossip key here) but never
	// gets Raft state, and cannot read through its own agent either.
	cfg := DefaultConfig()
	cfg.NodeName = "node-4"
	cfg.BindAddr = "127.0.0.1"
	p := procs.FreePorts(t, "127.0.0.1", 4)
	cfg.GossipPort, cfg.RPCPort, cfg.RaftPort, cfg.HTTPPort = p[0], p[1], p[2], p[3]
	cfg.DataDir = t.TempDir()
	cfg.Dev = true
	cfg.BootstrapExpect = 3
	cfg.Join = []string{dc.Agents[0].GossipAddr()}
	cfg.Security = foreign["node-4"]
	cfg.Logger = testLogger(t)
	intruder, err := NewAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = intruder.Shutdown() })
	poll.Until(t, 20*time.Second, func() error {
		for _, m := range dc.Agents[0].mesh.Members() {
			if m.Name == "node-4" && m.State == "alive" {
				return nil
			}
		}
		return errors.New("node-4 not yet seen in gossip")
	})
	// The leader now tries to replicate to it; give it the time several
	// reconcile rounds take, and check it stays without Raft state.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		if intruder.raft.HasState() || intruder.raft.State().Index() > 0 {
			t.Fatal("a node with another CA's certificate received Raft state")
		}
		time.Sleep(100 * time.Millisecond)
	}
	ic := tlsClient(t, intruder.RPCAddr(), foreign["mallory"])
	cctx, ccancel = context.WithTimeout(context.Background(), 3*time.Second)
	_, err = ic.ListJobs(cctx, &pb.ListJobsRequest{})
	ccancel()
	if err == nil {
		t.Fatal("the intruder's agent read the cluster's jobs")
	}
	// The cluster itself is unharmed.
	if _, err := c.ListJobs(ctx, &pb.ListJobsRequest{}); err != nil {
		t.Fatalf("cluster after the intruder: %v", err)
	}
}

// TestACLToken checks that mutating calls need the token (Unauthenticated
// without one, PermissionDenied with a wrong one), that reads do not, and
// that agents' own allocation reports (forwarded to the leader) carry it.
func TestACLToken(t *testing.T) {
	const token = "s3cret-token"
	tf := writeToken(t, token)
	dc := startCluster(t, 3, func(i int, c *Config) { c.Security.ACLTokenFile = tf })
	f := follower(dc)
	c := client(t, f)
	base, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spec := mustSpec(t, helloSpec)

	_, err := c.SubmitJob(base, &pb.SubmitJobRequest{Spec: spec})
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "GPUMESH_TOKEN") {
		t.Fatalf("submit without a token: %v, want Unauthenticated naming GPUMESH_TOKEN", err)
	}
	wrong := metadata.AppendToOutgoingContext(base, "authorization", "Bearer nope")
	_, err = c.SubmitJob(wrong, &pb.SubmitJobRequest{Spec: spec})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "not valid") {
		t.Fatalf("submit with a wrong token: %v, want PermissionDenied", err)
	}
	for name, call := range map[string]func(context.Context) error{
		"stop": func(ctx context.Context) error { _, err := c.StopJob(ctx, &pb.StopJobRequest{Id: "x"}); return err },
		"drain": func(ctx context.Context) error {
			_, err := c.DrainNode(ctx, &pb.DrainNodeRequest{NodeId: "node-1"})
			return err
		},
		"eligibility": func(ctx context.Context) error {
			_, err := c.NodeEligibility(ctx, &pb.NodeEligibilityRequest{NodeId: "node-1", Eligible: true})
			return err
		},
		"update allocations": func(ctx context.Context) error {
			_, err := c.UpdateAllocations(ctx, &pb.UpdateAllocationsRequest{})
			return err
		},
		"register node": func(ctx context.Context) error {
			_, err := c.RegisterNode(ctx, &pb.RegisterNodeRequest{Node: &pb.Node{Id: "x"}})
			return err
		},
	} {
		if err := call(base); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s without a token: %v, want Unauthenticated", name, err)
		}
	}
	// Reads need no token.
	if _, err := c.ListJobs(base, &pb.ListJobsRequest{}); err != nil {
		t.Fatalf("list without a token: %v", err)
	}
	// With the token, through a follower: the job runs to completion, which
	// needs the agents' status reports to pass the check on the leader.
	good := metadata.AppendToOutgoingContext(base, "authorization", "Bearer "+token)
	resp, err := c.SubmitJob(good, &pb.SubmitJobRequest{Spec: spec})
	if err != nil {
		t.Fatalf("submit with the token: %v", err)
	}
	done := waitJob(t, c, resp.Id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" })
	nodes := map[string]bool{}
	for _, al := range done.Allocations {
		nodes[al.NodeName] = true
	}
	if len(nodes) != 3 {
		t.Fatalf("ranks ran on %v; the test needs them on every node", nodes)
	}
	if _, err := c.StopJob(good, &pb.StopJobRequest{Id: resp.Id}); err != nil {
		t.Fatalf("stop with the token: %v", err)
	}
}

// TestGossipWithoutKeyIgnored: a cluster gossiping with a key does not let
// an agent without it in (nor one with another key).
func TestGossipWithoutKeyIgnored(t *testing.T) {
	const key = "3TNSmbKAqDyEwb0sqSn9Zl3Vm4hW06mFg3TZWUpIAWc="
	dc := startCluster(t, 3, func(i int, c *Config) { c.EncryptKey = key })
	for _, other := range []string{"", "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMTI="} {
		cfg := DefaultConfig()
		cfg.NodeName = "stranger"
		cfg.BindAddr = "127.0.0.1"
		p := procs.FreePorts(t, "127.0.0.1", 4)
		cfg.GossipPort, cfg.RPCPort, cfg.RaftPort, cfg.HTTPPort = p[0], p[1], p[2], p[3]
		cfg.DataDir = t.TempDir()
		cfg.Dev = true
		cfg.EncryptKey = other
		cfg.Join = []string{dc.Agents[0].GossipAddr(), dc.Agents[1].GossipAddr()}
		cfg.Logger = testLogger(t)
		a, err := NewAgent(cfg)
		if err != nil {
			t.Fatal(err)
		}
		// Let the stranger try for a while (its join retries with backoff).
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			for _, m := range dc.Agents[0].mesh.Members() {
				if m.Name == "stranger" {
					t.Fatalf("a member without the gossip key (key %q) was let in", other)
				}
			}
			if n := len(a.mesh.Members()); n != 1 {
				t.Fatalf("the stranger sees %d members, want only itself", n)
			}
			time.Sleep(100 * time.Millisecond)
		}
		_ = a.Shutdown()
	}
	if n := len(dc.Agents[0].mesh.Members()); n != 3 {
		t.Fatalf("members after the strangers: %d, want 3", n)
	}
}

func TestSecurityConfigValidate(t *testing.T) {
	err := SecurityConfig{CAFile: "ca.pem"}.Validate()
	if err == nil || !errors.Is(err, ErrTLSConfig) || !strings.Contains(err.Error(), "--tls-cert") {
		t.Fatalf("partial TLS config: %v", err)
	}
	if err := (SecurityConfig{}).Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := newSecurity(SecurityConfig{ACLTokenFile: writeToken(t, "  ")}, nil); !errors.Is(err, ErrACLConfig) {
		t.Fatalf("empty token file: %v", err)
	}
	if _, _, err := TLSFiles("/nonexistent/ca.pem", "", "", ""); !errors.Is(err, ErrTLSConfig) {
		t.Fatalf("missing CA: %v", err)
	}
	pki, _ := testPKI(t, "a")
	cl, srv, err := TLSFiles(pki["a"].CAFile, pki["a"].CertFile, pki["a"].KeyFile, "")
	if err != nil {
		t.Fatal(err)
	}
	if cl.ServerName != TLSServerName || srv.ClientAuth != tls.RequireAndVerifyClientCert || len(cl.Certificates) != 1 {
		t.Fatalf("tls configs: %+v %+v", cl, srv)
	}
}
