package consensus

import (
	"fmt"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// TestMinGPUMemorySpellings: every size the spec accepts for
// min_gpu_memory places the job (regression: "40G" passed validation, then
// the scheduler failed the job with "cannot place"), and a size above the
// GPUs' memory keeps it waiting.
func TestMinGPUMemorySpellings(t *testing.T) {
	tc := NewTestCluster(t, func(c *Config) { c.BootstrapExpect, c.MaxVoters, c.Standbys = 1, 1, 0 })
	tc.Start("srv", func(m *Member) { m.Ineligible = true })
	tc.AnnounceAll("srv")
	s := tc.WaitForLeader(10 * time.Second)
	sizes := []string{"40G", "40g", "40GiB", "40GB", "40960MiB", "80GiB", "81G"}
	gpu := &controlpb.Node{Id: "gpu1", Name: "gpu1", RpcAddr: "127.0.1.1:7947", Lifecycle: LifecycleOnDemand, MaxRanks: 8}
	for i := range sizes {
		gpu.Gpus = append(gpu.Gpus, &controlpb.GPU{Index: int32(i), Model: "H100", MemoryBytes: 80 << 30})
	}
	tc.AddClient(gpu)

	for _, size := range sizes {
		spec, err := jobspec.Parse(fmt.Appendf(nil, "name: mem\ntype: exec\nranks: 1\ngpus_per_rank: 1\nconstraints: {min_gpu_memory: %s}\nexec: {command: [\"true\"]}\n", size))
		if err != nil {
			t.Fatalf("min_gpu_memory %s: spec rejected: %v", size, err)
		}
		id, _, err := s.RegisterJob(ctxT(t), spec)
		if err != nil {
			t.Fatalf("min_gpu_memory %s: %v", size, err)
		}
		fits := size != "81G"
		var j *controlpb.Job
		poll.Until(t, 10*time.Second, func() (bool, string) {
			j = s.State().Job(id)
			if j == nil {
				return false, "no job yet"
			}
			placed := len(s.State().Allocations(id)) == 1
			if fits {
				return placed, fmt.Sprintf("min_gpu_memory %s: job %s (%s), want it placed", size, j.Status, j.StatusReason)
			}
			return j.Status == JobPending && j.StatusReason != "", fmt.Sprintf("min_gpu_memory %s: job %s, want pending with a reason", size, j.Status)
		})
		if j.Status == JobFailed {
			t.Fatalf("min_gpu_memory %s: job failed: %s", size, j.StatusReason)
		}
	}
}
