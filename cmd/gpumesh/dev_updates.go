package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// devUpdatePoll is how often `gpumesh dev` looks at its services for the
// progress of rolling updates.
const devUpdatePoll = 500 * time.Millisecond

// rollout is what `gpumesh dev` last said about one service's rolling
// update.
type rollout struct {
	specGen uint64
	started time.Time
	old     int    // live replicas on an older spec, as last said
	stalled string // the stall last said, "" if none
	done    bool
}

// updateNews compares the live service jobs with what was last said of
// their rolling updates (seen, by job ID, updated in place) and returns
// the lines to print: an update started, each replica replaced, a
// replacement that failed or is unhealthy (the update stalls there, the
// old replicas keep serving), the update done. first is the first look:
// updates already finished then are not news.
func updateNews(seen map[string]*rollout, jobs []*pb.GetJobResponse, now time.Time, first bool) []string {
	var lines []string
	for _, r := range jobs {
		j := r.Job
		if j.SpecGeneration == 0 {
			continue // never updated
		}
		name := j.Spec.GetName()
		old, live := oldSpecReplicas(r)
		ro := seen[j.Id]
		if ro == nil || ro.specGen != j.SpecGeneration {
			ro = &rollout{specGen: j.SpecGeneration, started: now, old: old}
			seen[j.Id] = ro
			if first && old == 0 {
				ro.done = true
				continue
			}
			lines = append(lines, fmt.Sprintf("==> service %s (job %s): rolling update to spec generation %d: %d replicas on the previous spec to replace, one at a time", name, j.Id, j.SpecGeneration, old))
		}
		if ro.done {
			continue
		}
		if old < ro.old {
			lines = append(lines, fmt.Sprintf("    service %s: %d of %d replicas on the new spec", name, live-old, live))
		}
		ro.old = old
		if why := updateStall(r); why != ro.stalled {
			ro.stalled = why
			if why != "" {
				lines = append(lines, fmt.Sprintf("==> service %s: rolling update stalled: %s; the %d old replicas keep serving. Fix the spec and run it again (gpumesh service status %s)", name, why, old, name))
			}
		}
		if old == 0 && live >= int(wantedReplicas(j)) && healthyCount(r) == live {
			ro.done = true
			lines = append(lines, fmt.Sprintf("==> service %s: rolling update done: %d replicas on spec generation %d, all healthy (%s after it was first seen)", name, live, j.SpecGeneration, now.Sub(ro.started).Round(100*time.Millisecond)))
		}
	}
	return lines
}

// updateStall says why a rolling update cannot go on, "" while it can: a
// replica on the new spec failed, or turned unhealthy after its grace.
func updateStall(r *pb.GetJobResponse) string {
	for _, al := range r.Allocations {
		if onOldSpec(r.Job, al) {
			continue
		}
		switch {
		case al.ClientStatus == consensus.AllocFailed:
			return fmt.Sprintf("replica %d on the new spec failed on %s (%s)", al.Rank, dash(al.NodeName), dash(al.Message))
		case al.DesiredStatus == consensus.DesiredRun && al.ClientStatus == consensus.AllocRunning && al.Health == "unhealthy":
			return fmt.Sprintf("replica %d on the new spec is unhealthy on %s", al.Rank, dash(al.NodeName))
		}
	}
	return ""
}

// crashNews compares the crash loops of the live services with those
// already told (told, by job ID and slot, updated in place) and returns
// the lines to print: a slot that reached consensus.CrashLoopAt failures in a row,
// and one told before whose count has ended (a replica stayed healthy for
// restart.reset_after, or the service is gone).
func crashNews(told map[string]string, jobs []*pb.GetJobResponse, now time.Time) []string {
	var lines []string
	looping := map[string]bool{}
	for _, r := range jobs {
		name := r.Job.Spec.GetName()
		for _, b := range consensus.ServiceBackoffs(r.Job, r.Allocations, now) {
			key := fmt.Sprintf("%s/%d", r.Job.Id, b.Slot)
			if b.Failures < consensus.CrashLoopAt {
				continue
			}
			looping[key] = true
			if told[key] == "" {
				told[key] = fmt.Sprintf("service %s: replica %d", name, b.Slot)
				lines = append(lines, fmt.Sprintf("==> service %s: replica %d is crash-looping (%d failures in a row; its replacements wait up to %s): gpumesh service status %s",
					name, b.Slot, b.Failures, serviceMaxDelay(r.Job), name))
			}
		}
	}
	var over []string
	for key := range told {
		if !looping[key] {
			over = append(over, key)
		}
	}
	sort.Strings(over)
	for _, key := range over {
		lines = append(lines, fmt.Sprintf("==> %s is no longer crash-looping", told[key]))
		delete(told, key)
	}
	return lines
}

// serviceMaxDelay is a service's crash-loop back-off cap.
func serviceMaxDelay(j *pb.Job) time.Duration {
	if d := j.Spec.GetRestart().GetMaxDelay(); d != nil {
		return d.AsDuration()
	}
	return jobspec.DefaultRestartMaxDelay
}

func healthyCount(r *pb.GetJobResponse) int {
	n := 0
	for _, al := range liveReplicas(r) {
		if al.Health == "healthy" {
			n++
		}
	}
	return n
}

// followUpdates prints the news of rolling updates (updateNews) of the
// cluster at f until ctx ends.
func followUpdates(ctx context.Context, f *clientFlags, out io.Writer) {
	c, done, err := f.dial()
	if err != nil {
		return
	}
	defer done()
	seen := map[string]*rollout{}
	told := map[string]string{}
	first := true
	t := time.NewTicker(devUpdatePoll)
	defer t.Stop()
	for {
		qctx, cancel := f.ctx(ctx)
		jobs, err := listServices(qctx, c, "")
		cancel()
		if err == nil {
			for _, l := range updateNews(seen, jobs, time.Now(), first) {
				fmt.Fprintln(out, l)
			}
			for _, l := range crashNews(told, jobs, time.Now()) {
				fmt.Fprintln(out, l)
			}
			first = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
