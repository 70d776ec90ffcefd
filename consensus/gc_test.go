package consensus

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

func purgeCmd(ids ...string) *fsmpb.Command {
	return &fsmpb.Command{Cmd: &fsmpb.Command_PurgeJobs{PurgeJobs: &fsmpb.PurgeJobs{Ids: ids}}}
}

// Purging removes ended jobs with every allocation and index entry, and
// leaves live jobs alone; replay of the same log gives the same state.
func TestFSMPurgeJobs(t *testing.T) {
	h := newFSMHarness(t)
	st := h.f.State()
	h.apply(nodesCmd(&fsmpb.Node{Id: "n1", Name: "one"}))
	for _, id := range []string{"done", "live"} {
		h.apply(registerCmd(id, 1))
		j := st.Job(id)
		plan := &fsmpb.JobPlan{JobId: id, ExpectModifyIndex: j.ModifyIndex, Status: JobRunning, Generation: 1, WorldSize: 1,
			Allocations: []*fsmpb.Allocation{{Id: id + ".1.0", JobId: id, Generation: 1, Rank: 0, NodeId: "n1"}}}
		h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{plan}}}})
	}
	h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: "done"}}})
	if n := h.apply(purgeCmd("done", "live", "missing")); n != 1 {
		t.Fatalf("purged %v jobs, want 1 (the ended one)", n)
	}
	if st.Job("done") != nil || len(st.Allocations("done")) != 0 || st.Allocation("done.1.0") != nil {
		t.Fatal("the ended job or its allocation is still in the state")
	}
	if got := st.AllocationsByNode("n1"); len(got) != 1 || got[0].Id != "live.1.0" {
		t.Fatalf("allocations by node after purge = %v", got)
	}
	if st.Job("live") == nil || len(st.Allocations("live")) != 1 {
		t.Fatal("a running job was purged")
	}
	// Replaying the log on a fresh FSM gives the same snapshot.
	h2 := newFSMHarness(t)
	for _, l := range h.log {
		h2.f.Apply(l)
	}
	if string(snapshotBytes(t, h.f)) != string(snapshotBytes(t, h2.f)) {
		t.Fatal("replay after a purge differs")
	}
}

// The leader purges jobs that ended longer ago than JobGCAge.
func TestLeaderCollectsEndedJobs(t *testing.T) {
	tc := MakeTestCluster(t, 1, func(c *Config) {
		c.BootstrapExpect, c.MaxVoters, c.Standbys = 1, 1, 0
		c.JobGCAge, c.JobGCInterval = 200*time.Millisecond, 50*time.Millisecond
	})
	l := tc.WaitForLeader(5 * time.Second)
	id, _, err := l.RegisterJob(ctxT(t), gpuJob("old", 1))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.StopJob(ctxT(t), id); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() (bool, string) {
		return l.State().Job(id) == nil, "ended job not purged"
	})
	live, _, err := l.RegisterJob(ctxT(t), gpuJob("live", 1))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if l.State().Job(live) == nil {
			t.Fatal("a pending job was purged")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The leader purges the ended allocations of a live job that restarts
// again and again, through the log: every server drops the same ones, and
// the job keeps restarting.
func TestLeaderCollectsEndedAllocationsOnEveryServer(t *testing.T) {
	tc := MakeTestCluster(t, 3, func(c *Config) {
		c.JobGCAge, c.JobGCInterval, c.AllocGCKeep = 0, 50*time.Millisecond, 1
	})
	l := tc.WaitForLeader(10 * time.Second)
	addGPUNode(tc, "c1", 1)
	addGPUNode(tc, "c2", 1)
	WaitFor(t, 10*time.Second, func() (bool, string) { return len(l.State().Nodes()) == 5, "client nodes not reconciled" })
	spec := gpuJob("loop", 1)
	spec.Restart.Attempts = 100
	id, _, err := l.RegisterJob(ctxT(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	const gens = 8
	for gen := uint64(1); gen <= gens; gen++ {
		waitJob(t, l, id, fmt.Sprintf("generation %d placed", gen), running(gen, 1))
		a := genAllocs(l, id, gen)[0]
		report(t, l, &controlpb.Allocation{Id: a.Id, ClientStatus: AllocFailed, ExitCode: 1})
	}
	waitJob(t, l, id, "placed after the last failure", running(gens+1, 1))
	// Rank 0 keeps its newest ended allocation and the live one.
	ids := func(s *Server) string {
		var out []string
		for _, a := range s.State().Allocations(id) {
			out = append(out, a.Id)
		}
		return strings.Join(out, " ")
	}
	want := fmt.Sprintf("%s.%d.0 %s.%d.0", id, gens, id, gens+1)
	WaitFor(t, 10*time.Second, func() (bool, string) { return ids(l) == want, "leader holds " + ids(l) + ", want " + want })
	for _, s := range tc.Live() {
		WaitFor(t, 10*time.Second, func() (bool, string) {
			var byNode []string
			for _, n := range []string{"c1", "c2"} {
				for _, a := range s.State().AllocationsByNode(n) {
					byNode = append(byNode, a.Id)
				}
			}
			sort.Strings(byNode)
			return ids(s) == want && strings.Join(byNode, " ") == want, fmt.Sprintf("server %s holds %s (by node %v), want %s", s.cfg.NodeID, ids(s), byNode, want)
		})
	}
	if j := l.State().Job(id); j.Restarts != gens || j.Status != JobRunning {
		t.Fatalf("the job after %d failures: %v", gens, j)
	}
}
