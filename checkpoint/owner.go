package checkpoint

import (
	"fmt"
	"time"
)

// Owner is the job about to use a store's checkpoints. A job is the same
// across its generations (one ID) and across submissions of the same job
// file (a new ID each time, the same name), so a resubmitted job resumes
// where the last submission stopped; a job of another name does not
// silently continue someone else's state.
type Owner struct {
	// Name is the job's name (JobSpec.name); empty outside a job, where
	// nothing is checked.
	Name string
	// ID is this submission's job ID.
	ID string
	// ResumeFrom names another job (by name or ID) whose checkpoints this
	// one may take over on purpose (the job spec's checkpoint.resume_from).
	ResumeFrom string
}

// Verdict is what Owner.Check decided about a manifest.
type Verdict int

const (
	// Refused is the zero Verdict, returned only together with an error
	// wrapping ErrOtherJob: the job must not use the checkpoint. Being the
	// zero value, a verdict read without its error is never taken for Own.
	Refused Verdict = iota
	// Own: the job's own checkpoint (an earlier generation, an earlier
	// submission of the same name, or a job it resumes from on purpose).
	Own Verdict = iota
	// Unowned: the manifest names no job by name (written before names
	// were recorded, or outside a job): the caller resumes from it and
	// warns.
	Unowned
)

// String names the verdict.
func (v Verdict) String() string {
	switch v {
	case Refused:
		return "refused"
	case Own:
		return "own"
	case Unowned:
		return "unowned"
	}
	return fmt.Sprintf("Verdict(%d)", int(v))
}

// Check decides whether o may resume from m: Own or Unowned with a nil
// error, or Refused with an error wrapping ErrOtherJob that names both jobs
// and what to do.
func (o Owner) Check(m Manifest) (Verdict, error) {
	switch {
	case o.Name == "" || m.JobName == o.Name || (m.Job != "" && m.Job == o.ID):
		return Own, nil
	case o.ResumeFrom != "" && (m.JobName == o.ResumeFrom || m.Job == o.ResumeFrom):
		return Own, nil
	case m.JobName == "":
		return Unowned, nil
	}
	return Refused, fmt.Errorf("%w: the newest checkpoint (step %d, saved %s) was written by job %q (ID %s), and this is job %q (ID %s), "+
		"which would silently continue that job's state and prune its checkpoints. Give this job a checkpoint.uri of its own, "+
		"or, to continue from those checkpoints on purpose, set checkpoint.resume_from: %s in the job file (or run it with `gpumesh job run --resume-from %s`)",
		ErrOtherJob, m.Step, m.Time.UTC().Format(time.RFC3339), m.JobName, m.Job, o.Name, o.ID, m.JobName, m.JobName)
}
