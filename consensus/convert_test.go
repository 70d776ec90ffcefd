package consensus

import (
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
)

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// Every field of the API's state messages, nested ones included, survives
// the trip through the log's twins: an API field added without its twin in
// fsm.proto (or renumbered, or retyped) fails here, before a log drops it.
func TestFSMMessagesCoverTheAPI(t *testing.T) {
	check := func(name string, api proto.Message, there, back func(proto.Message) (proto.Message, error)) {
		n := 0
		fill(api.ProtoReflect(), &n, 3)
		logged, err := there(api)
		if err != nil {
			t.Fatalf("%s to the log: %v", name, err)
		}
		got, err := back(logged)
		if err != nil {
			t.Fatalf("%s from the log: %v", name, err)
		}
		if !proto.Equal(api, got) {
			t.Errorf("%s loses fields on its way through the log:\napi:   %v\nafter: %v", name, api, got)
		}
	}
	check("Node", &controlpb.Node{},
		func(m proto.Message) (proto.Message, error) { return twin[fsmpb.Node](m) },
		func(m proto.Message) (proto.Message, error) { return twin[controlpb.Node](m) })
	check("Job", &controlpb.Job{},
		func(m proto.Message) (proto.Message, error) { return twin[fsmpb.Job](m) },
		func(m proto.Message) (proto.Message, error) { return twin[controlpb.Job](m) })
	check("Allocation", &controlpb.Allocation{},
		func(m proto.Message) (proto.Message, error) { return twin[fsmpb.Allocation](m) },
		func(m proto.Message) (proto.Message, error) { return twin[controlpb.Allocation](m) })
	check("Allocation (allocFromLog)", &controlpb.Allocation{},
		func(m proto.Message) (proto.Message, error) { return twin[fsmpb.Allocation](m) },
		func(m proto.Message) (proto.Message, error) { return allocFromLog(m.(*fsmpb.Allocation)), nil })
}

var allocSink *controlpb.Allocation

// BenchmarkTwin is the cost of converting a job spec and an allocation as
// the scheduler writes them to the log's messages (once per write on the
// leader) and back (once per entry on every server), beside proto.Clone,
// which the FSM did instead before the log had its own messages.
func BenchmarkTwin(b *testing.B) {
	spec := &controlpb.JobSpec{Name: "train", Type: "exec", Ranks: 8, GpusPerRank: 1, Placement: "spread",
		Restart: &controlpb.RestartPolicy{Attempts: 3, Delay: durationpb.New(5 * time.Second)},
		Exec:    &controlpb.ExecSpec{Command: []string{"torchrun", "train.py"}, Env: map[string]string{"EPOCHS": "10"}}}
	alloc := &controlpb.Allocation{Id: "train-1a2b3c4d.1.3", JobId: "train-1a2b3c4d", Generation: 1, Rank: 3, WorldSize: 8,
		LocalRank: 1, LocalWorldSize: 2, GroupRank: 1, GroupWorldSize: 4, NodeId: "0f2c04723e327855", NodeName: "node-2",
		Gpus: []int32{1}, MasterAddr: "10.0.0.1", MasterPort: 29500, DesiredStatus: DesiredRun, ClientStatus: AllocPending, RankAddr: "10.0.0.2:7947"}
	for _, m := range []proto.Message{spec, alloc} {
		name := string(m.ProtoReflect().Descriptor().Name())
		b.Run(name+"/twin-there-and-back", func(b *testing.B) {
			for range b.N {
				switch m := m.(type) {
				case *controlpb.JobSpec:
					must(twin[controlpb.JobSpec](must(twin[fsmpb.JobSpec](m))))
				case *controlpb.Allocation:
					must(twin[controlpb.Allocation](must(twin[fsmpb.Allocation](m))))
				}
			}
		})
		if a, ok := m.(*controlpb.Allocation); ok {
			logged := must(twin[fsmpb.Allocation](a))
			b.Run(name+"/allocFromLog", func(b *testing.B) {
				for range b.N {
					allocSink = allocFromLog(logged)
				}
			})
		}
		b.Run(name+"/clone", func(b *testing.B) {
			for range b.N {
				proto.Clone(m)
			}
		})
	}
}
