package consensus

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
)

// RegisterJobID registers spec under an id chosen by the caller, so that a
// submission retried after a lost answer (a leader change, a dropped
// connection) is stored once: a second call with the same id and spec
// returns the first job; the same id with another spec is refused. An
// empty id picks a fresh one. A service named like a live one is refused
// with a *ServiceExistsError (checked in the log's order, so two
// submissions of a new name at once register one job).
func (s *Server) RegisterJobID(ctx context.Context, id string, spec *controlpb.JobSpec) (string, uint64, error) {
	if id == "" {
		return s.RegisterJob(ctx, spec)
	}
	if spec == nil {
		return "", 0, fmt.Errorf("%w: job spec is nil", ErrInvalidArgument)
	}
	logSpec, err := twin[fsmpb.JobSpec](spec)
	if err != nil {
		return "", 0, fmt.Errorf("%w: job spec: %v", ErrInvalidArgument, err)
	}
	resp, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: logSpec, UniqueService: true}}})
	if errors.Is(err, ErrJobExists) {
		if j := s.State().Job(id); j != nil && proto.Equal(j.Spec, spec) {
			return id, j.CreateIndex, nil
		}
		return "", idx, fmt.Errorf("%w: job id %q is taken by another spec", ErrInvalidArgument, id)
	}
	if err != nil {
		return "", idx, err
	}
	return resp.(string), idx, nil
}
