package consensus

import (
	"google.golang.org/protobuf/proto"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
)

// The Raft log and snapshots hold fsmpb's own Node, Job, Allocation and
// JobSpec, twins of the API's (controlpb) with the same field numbers; the
// state store and the callers of this package use the API's. twin converts
// between the two by field number, through the wire format. A field the
// target lacks is dropped, not carried along as unknown bytes: an API field
// the log does not know never reaches the log unnoticed
// (TestFSMMessagesCoverTheAPI fails first).

var twinUnmarshal = proto.UnmarshalOptions{DiscardUnknown: true}

// twin returns m as a new message of type *D (nil for a nil m).
func twin[D any, PD interface {
	*D
	proto.Message
}](m proto.Message) (PD, error) {
	if m == nil || !m.ProtoReflect().IsValid() {
		return nil, nil
	}
	b, err := proto.Marshal(m)
	if err != nil {
		return nil, err
	}
	out := PD(new(D))
	if err := twinUnmarshal.Unmarshal(b, out); err != nil {
		return nil, err
	}
	return out, nil
}

// twins converts every message of ms (see twin).
func twins[D any, PD interface {
	*D
	proto.Message
}, S proto.Message](ms []S) ([]PD, error) {
	out := make([]PD, len(ms))
	for i, m := range ms {
		var err error
		if out[i], err = twin[D, PD](m); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// allocFromLog is twin[controlpb.Allocation] written out, for the
// allocations of ApplyPlans, the hot path of placement (BenchmarkTwin);
// TestFSMMessagesCoverTheAPI checks it field by field against the API. It
// shares a's slices and values: a is decoded from the entry and dropped.
func allocFromLog(a *fsmpb.Allocation) *controlpb.Allocation {
	return &controlpb.Allocation{
		Id: a.Id, JobId: a.JobId, Generation: a.Generation, Rank: a.Rank, WorldSize: a.WorldSize,
		LocalRank: a.LocalRank, LocalWorldSize: a.LocalWorldSize, GroupRank: a.GroupRank, GroupWorldSize: a.GroupWorldSize,
		NodeId: a.NodeId, NodeName: a.NodeName, Gpus: a.Gpus, MasterAddr: a.MasterAddr, MasterPort: a.MasterPort,
		DesiredStatus: a.DesiredStatus, ClientStatus: a.ClientStatus, ExitCode: a.ExitCode, Message: a.Message,
		StartTime: a.StartTime, FinishTime: a.FinishTime, Result: a.Result, RankAddr: a.RankAddr,
		RestartCount: a.RestartCount, CreateIndex: a.CreateIndex, ModifyIndex: a.ModifyIndex,
		Ports: a.Ports, Health: a.Health, StartFailure: a.StartFailure,
		SlotFailures: a.SlotFailures, HealthyTime: a.HealthyTime,
	}
}
