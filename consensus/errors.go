package consensus

import (
	"errors"
	"fmt"
)

var (
	// ErrNotLeader is matched (errors.Is) by every *NotLeaderError: the
	// write was not attempted because this server is not the Raft leader.
	// Forward it to the leader named in the error.
	ErrNotLeader = errors.New("not the raft leader")
	// ErrNoLeader means no leader is known right now (an election is running
	// or the cluster has not bootstrapped yet); retry shortly.
	ErrNoLeader = errors.New("no raft leader known; retry once an election is over")
	// ErrLeadershipLost means leadership was lost while a write was in
	// flight: it may or may not have been committed. Read the state before
	// retrying a non-idempotent write.
	ErrLeadershipLost = errors.New("leadership lost while the write was in flight; it may or may not be committed")
	// ErrShutdown is returned by calls on a server that was shut down.
	ErrShutdown = errors.New("consensus server is shut down")
	// ErrJobNotFound names a job id that is not in the state.
	ErrJobNotFound = errors.New("job not found")
	// ErrJobExists means a RegisterJob command carried an id already in use.
	ErrJobExists = errors.New("job id already exists")
	// ErrNodeNotFound names a node id that is not in the state.
	ErrNodeNotFound = errors.New("node not found")
	// ErrInvalidConfig is wrapped by every Config.Validate error.
	ErrInvalidConfig = errors.New("invalid consensus config")
	// ErrInvalidCommand means a log entry could not be decoded or names an
	// unknown command; it indicates a version mismatch between servers.
	ErrInvalidCommand = errors.New("invalid raft command")
	// ErrInvalidArgument is wrapped by errors about bad write arguments.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrServiceExists is matched by every *ServiceExistsError.
	ErrServiceExists = errors.New("a live service has this name")
)

// ServiceExistsError refuses to register a service named like a live one
// (job ID): the caller updates that one instead (a rolling update).
type ServiceExistsError struct {
	Name, ID string
}

func (e *ServiceExistsError) Error() string {
	return fmt.Sprintf("service %q is running as job %s; a spec of that name updates it", e.Name, e.ID)
}

// Is makes errors.Is(err, ErrServiceExists) true.
func (e *ServiceExistsError) Is(target error) bool { return target == ErrServiceExists }

// NotLeaderError is returned by writes on a server that is not the leader.
// LeaderID and LeaderRPCAddr are empty when no leader is known.
type NotLeaderError struct {
	LeaderID      string
	LeaderRPCAddr string
}

func (e *NotLeaderError) Error() string {
	if e.LeaderID == "" {
		return "not the raft leader and no leader is known; retry once an election is over"
	}
	return fmt.Sprintf("not the raft leader; forward to leader %s at %s", e.LeaderID, e.LeaderRPCAddr)
}

// Is makes errors.Is(err, ErrNotLeader) true, and errors.Is(err,
// ErrNoLeader) true as well when no leader is known.
func (e *NotLeaderError) Is(target error) bool {
	return target == ErrNotLeader || (target == ErrNoLeader && e.LeaderID == "")
}
