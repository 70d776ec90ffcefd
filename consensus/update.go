package consensus

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// Outcomes of a submission (SubmitJobResponse.outcome).
const (
	SubmitRegistered = "registered" // a new job
	SubmitUpdated    = "updated"    // a running service took the new spec
	SubmitUnchanged  = "unchanged"  // the running service has this spec already
	SubmitScaled     = "scaled"     // a running service took a new replica count only
)

// RunningService returns the live (not ended, not stopping) service job of
// jobs named name, or nil. A `job run` of a service spec of that name
// updates it instead of starting a second one.
func RunningService(jobs []*controlpb.Job, name string) *controlpb.Job {
	for _, j := range jobs {
		if j.Spec.GetType() == jobspec.TypeService && j.Spec.GetName() == name && !j.StopRequested && !JobTerminal(j.Status) {
			return j
		}
	}
	return nil
}

// UpdateService gives the running service id a new spec (the caller has
// validated it): a rolling update, in which the scheduler replaces the
// replicas one at a time, each old one stopped only once its replacement is
// healthy (SubmitUpdated). A spec that differs only in how many replicas to
// run (ScaleOnly) keeps the running replicas: the scheduler adds or removes
// some (SubmitScaled). It returns SubmitUnchanged, and writes nothing, when
// spec equals the service's current spec.
func (s *Server) UpdateService(ctx context.Context, id string, spec *controlpb.JobSpec) (string, uint64, error) {
	j := s.State().Job(id)
	if j == nil {
		return "", 0, fmt.Errorf("%w: %s", ErrJobNotFound, id)
	}
	if proto.Equal(j.Spec, spec) {
		return SubmitUnchanged, j.ModifyIndex, nil
	}
	logSpec, err := twin[fsmpb.JobSpec](spec)
	if err != nil {
		return "", 0, fmt.Errorf("%w: job spec: %v", ErrInvalidArgument, err)
	}
	keep := ScaleOnly(j.Spec, spec)
	_, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_UpdateJob{UpdateJob: &fsmpb.UpdateJob{Id: id, Spec: logSpec, KeepGeneration: keep}}})
	if err != nil {
		return "", idx, err
	}
	if keep {
		return SubmitScaled, idx, nil
	}
	return SubmitUpdated, idx, nil
}

// ScaleOnly reports whether service specs a and b differ only in how many
// replicas to run: replicas (ranks), min_replicas, max_replicas,
// target_in_flight and scale_in_cooldown. Replicas running a, told to run
// b instead, would run the same command with the same resources.
func ScaleOnly(a, b *controlpb.JobSpec) bool {
	strip := func(s *controlpb.JobSpec) *controlpb.JobSpec {
		c := proto.Clone(s).(*controlpb.JobSpec)
		c.Replicas, c.Ranks, c.MinRanks, c.MaxRanks = 0, 0, 0, 0
		if v := c.Service; v != nil {
			v.MinReplicas, v.MaxReplicas, v.TargetInFlight, v.ScaleInCooldown = 0, 0, 0, nil
		}
		return c
	}
	return a != nil && b != nil && proto.Equal(strip(a), strip(b))
}

// updateJob applies an UpdateJob command: only a live service's spec may
// change, to another service spec with the same route port. keep (the
// leader found only the replica count changed) leaves the spec generation,
// so no replica is replaced.
func (f *FSM) updateJob(idx uint64, now *timestamppb.Timestamp, id string, spec *controlpb.JobSpec, keep bool) any {
	st := f.state
	j := st.jobs[id]
	if j == nil {
		return fmt.Errorf("%w: %s", ErrJobNotFound, id)
	}
	if spec == nil || j.Spec.GetType() != jobspec.TypeService || spec.GetType() != jobspec.TypeService {
		return fmt.Errorf("%w: update job %s: only a service's spec may be updated, with a service spec", ErrInvalidArgument, id)
	}
	if j.StopRequested || JobTerminal(j.Status) {
		return fmt.Errorf("%w: update job %s: it has ended (%s); run the spec as a new job", ErrInvalidArgument, id, j.Status)
	}
	if proto.Equal(j.Spec, spec) {
		return nil
	}
	if from, to := j.Spec.GetService().GetRoutePort(), spec.GetService().GetRoutePort(); from != to {
		// Routers find a replica by the route port's name: the old
		// replicas, which have no port of the new name, would drop out of
		// routing before their replacements are healthy.
		return fmt.Errorf("%w: update job %s: the route port changes from %q to %q, which the old replicas do not listen on; run the new spec under another name, or stop the service first", ErrInvalidArgument, id, from, to)
	}
	nj := proto.Clone(j).(*controlpb.Job)
	nj.Spec = spec
	if !keep {
		nj.SpecGeneration = j.Generation + 1
	}
	nj.StatusTime = now
	nj.ModifyIndex = idx
	st.putJobLocked(nj)
	f.events.job(id)
	return nil
}
