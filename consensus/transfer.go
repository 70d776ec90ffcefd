package consensus

import (
	"fmt"

	"github.com/hashicorp/raft"
)

// TransferLeadershipTo hands leadership to the voter with the given node ID
// (an operator's choice, e.g. before maintenance). An empty id lets Raft
// pick the most up-to-date voter.
func (s *Server) TransferLeadershipTo(id string) error {
	if id == "" {
		return s.TransferLeadership()
	}
	if !s.IsLeader() {
		return s.notLeader()
	}
	f := s.raft.GetConfiguration()
	if err := s.await(f); err != nil {
		return err
	}
	for _, srv := range f.Configuration().Servers {
		if string(srv.ID) != id {
			continue
		}
		if srv.Suffrage != raft.Voter {
			return fmt.Errorf("%w: node %s is not a voter, so it cannot lead", ErrInvalidArgument, id)
		}
		if err := s.await(s.raft.LeadershipTransferToServer(srv.ID, srv.Address)); err != nil {
			return fmt.Errorf("leadership transfer to %s: %w", id, err)
		}
		return nil
	}
	return fmt.Errorf("%w: node %s is not in the raft configuration", ErrNodeNotFound, id)
}
