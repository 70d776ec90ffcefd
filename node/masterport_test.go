package node

import (
	"context"
	"fmt"
	"hash/fnv"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// A process outside gpumesh holding the MASTER_PORT the scheduler picks
// for rank 0 must not fail the job: the node sees the port taken before
// starting the rank, and the job runs again on another port without a
// restart counted.
func TestClusterMasterPortHeldOutsideIsPlacedAgain(t *testing.T) {
	dc := startCluster(t, 1, nil)
	c := client(t, dc.Agents[0])
	const id = "port-held-outside"
	// The port the scheduler starts from for generation 1 (consensus's
	// pickPort: the default range 29500-29999 from a hash of job and
	// generation; no other job holds one here).
	h := fnv.New32a()
	fmt.Fprintf(h, "%s/%d", id, 1)
	port := 29500 + int(h.Sum32()%500)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Skipf("port %d is already taken on this machine: %v", port, err)
	}
	defer ln.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: mustSpec(t, `
name: port-held-outside
ranks: 1
restart: {attempts: 0}
exec:
  command: ["sh", "-c", "echo master port $MASTER_PORT"]
`)})
	if err != nil {
		t.Fatal(err)
	}
	final := waitJob(t, c, resp.Id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" || r.Job.Status == "failed" })
	if final.Job.Status != "complete" || final.Job.Restarts != 0 || final.Job.Generation != 2 {
		t.Fatalf("job %s generation %d restarts %d (%s); want complete in generation 2 without a restart",
			final.Job.Status, final.Job.Generation, final.Job.Restarts, final.Job.StatusReason)
	}
	var gen1 *pb.Allocation
	for _, a := range final.Allocations {
		if a.Generation == 1 {
			gen1 = a
		}
	}
	if gen1 == nil || gen1.MasterPort != int32(port) || gen1.StartFailure != "master-port-busy" || !strings.Contains(gen1.Message, fmt.Sprintf("MASTER_PORT %d is in use", port)) {
		t.Fatalf("generation 1's rank 0 (want port %d refused as busy): %v", port, gen1)
	}
	out := readLogs(t, c, resp.Id, 0, 2)
	if !strings.Contains(out, "master port ") || strings.Contains(out, fmt.Sprintf("master port %d\n", port)) {
		t.Fatalf("generation 2's log %q: want another port than %d", out, port)
	}
}

// The agent refuses to start a rank whose MASTER_PORT a process outside
// gpumesh holds: rank 0 of an exec job and every replica of a service (each
// its own world of one, rank = its slot); other ranks and built-in jobs
// do not listen there.
func TestMasterPortFreeChecksServiceReplicas(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := int32(ln.Addr().(*net.TCPAddr).Port)
	for _, tc := range []struct {
		typ  string
		rank int32
		busy bool
	}{
		{"exec", 0, true},
		{"exec", 1, false},
		{"service", 0, true},
		{"service", 2, true},
		{"allreduce", 0, false},
	} {
		err := masterPortFree(tc.typ, &pb.Allocation{Rank: tc.rank, MasterPort: port})
		if got := err != nil; got != tc.busy {
			t.Errorf("%s rank %d on a held port: error %v, want busy %v", tc.typ, tc.rank, err, tc.busy)
		}
	}
}

// A replica's named ports pass over the ports avoid names (another task's
// named ports picked free but not bound yet, the replica's MASTER_PORT):
// the avoided pick stays held while the next is drawn, so it cannot come
// back.
func TestAllocatePortsPassesOverAvoidedPorts(t *testing.T) {
	var avoided []int32
	avoid := func(p int32) bool {
		if len(avoided) < 2 { // the first two picks are "in use"
			avoided = append(avoided, p)
			return true
		}
		return slices.Contains(avoided, p)
	}
	ports, err := allocatePorts("127.0.0.1", []string{"http", "grpc"}, avoid)
	if err != nil {
		t.Fatal(err)
	}
	if len(avoided) != 2 {
		t.Fatalf("avoid was asked about %d picks before the ports were taken, want 2 refused", len(avoided))
	}
	if len(ports) != 2 || ports["http"] == ports["grpc"] {
		t.Fatalf("ports %v: want two different ones", ports)
	}
	for name, p := range ports {
		if slices.Contains(avoided, p) {
			t.Fatalf("port %q = %d, which was to be avoided (%v)", name, p, avoided)
		}
	}
	// The agent's own book: the ports its running tasks were given.
	r := &runner{tasks: map[string]*runningTask{
		"svc.1.0": {alloc: &pb.Allocation{MasterPort: 29501}, task: &serviceTask{ports: map[string]int32{"http": 40001}}},
		"job.1.1": {alloc: &pb.Allocation{}},
	}}
	if got := r.portsGivenLocked(); len(got) != 2 || !got[29501] || !got[40001] {
		t.Fatalf("ports given: %v, want 29501 and 40001", got)
	}
}
