package consensus

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
)

// Each golden file holds a Raft log and a snapshot written by one build's
// FSM, with the state they produce as the Control API shows it: v1 by commit
// daecd94 (before the FSM had messages of its own), v2 by the build that
// added services, their rolling updates, node eligibility, checkpoints and
// end causes (every field of every command then), v3 by the build that
// added Allocation.start_failure, v4 by the build that added
// PurgeAllocations (allocation garbage collection), v5 by the build that
// added JobSpec.ranks_per_gpu. Every build must read all of them;
// TestWriteFSMGolden writes goldenPath, the newest.
var (
	goldenPaths = []string{filepath.Join("testdata", "fsm-v1.golden.json"), filepath.Join("testdata", "fsm-v2.golden.json"),
		filepath.Join("testdata", "fsm-v3.golden.json"), filepath.Join("testdata", "fsm-v4.golden.json"), goldenPath}
	goldenPath = filepath.Join("testdata", "fsm-v5.golden.json")
)

type golden struct {
	Log []struct {
		Index uint64 `json:"index"`
		Data  string `json:"data"` // base64 of the entry
	} `json:"log"`
	Snapshot string `json:"snapshot"` // base64 of the persisted snapshot
	State    struct {
		Index       uint64            `json:"index"`
		Nodes       []json.RawMessage `json:"nodes"`
		Jobs        []json.RawMessage `json:"jobs"`
		Allocations []json.RawMessage `json:"allocations"`
	} `json:"state"`
}

// fill sets every field of m (one element for lists and maps, the first
// member of each oneof) to a value derived from *n, so that an encoded
// message exercises every field number.
func fill(m protoreflect.Message, n *int, depth int) {
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if o := fd.ContainingOneof(); o != nil && !o.IsSynthetic() && o.Fields().Get(0) != fd {
			continue
		}
		*n++
		switch {
		case fd.IsList():
			l := m.Mutable(fd).List()
			if fd.Kind() == protoreflect.MessageKind {
				if depth > 0 {
					fill(l.AppendMutable().Message(), n, depth-1)
				}
			} else {
				l.Append(scalar(fd, *n))
			}
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			k := scalar(fd.MapKey(), *n).MapKey()
			if fd.MapValue().Kind() == protoreflect.MessageKind {
				if depth > 0 {
					fill(mp.Mutable(k).Message(), n, depth-1)
				}
			} else {
				mp.Set(k, scalar(fd.MapValue(), *n))
			}
		case fd.Kind() == protoreflect.MessageKind:
			if depth > 0 {
				fill(m.Mutable(fd).Message(), n, depth-1)
			}
		default:
			m.Set(fd, scalar(fd, *n))
		}
	}
}

func scalar(fd protoreflect.FieldDescriptor, n int) protoreflect.Value {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		return protoreflect.ValueOfEnum(fd.Enum().Values().Get(fd.Enum().Values().Len() - 1).Number())
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(n))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(int64(n))
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(n))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(n))
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(float32(n) + 0.5)
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(float64(n) + 0.25)
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(fmt.Sprintf("%s-%d", fd.Name(), n))
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte{byte(n)})
	}
	panic(fd.Kind())
}

func filled[M proto.Message](m M, n *int) M {
	fill(m.ProtoReflect(), n, 3)
	return m
}

// goldenCommands is the log the golden file holds: every command type, with
// every field of the messages they carry set.
func goldenCommands() []*fsmpb.Command {
	n := 0
	node := func(id string) *fsmpb.Node {
		nd := filled(&fsmpb.Node{}, &n)
		nd.Id, nd.Status, nd.Ineligible, nd.MaxRanks = id, NodeReady, false, 8
		return nd
	}
	spec := filled(&fsmpb.JobSpec{}, &n)
	alloc := func(id, job string, rank int32) *fsmpb.Allocation {
		a := filled(&fsmpb.Allocation{}, &n)
		a.Id, a.JobId, a.NodeId, a.Rank, a.Generation = id, job, "n1", rank, 1
		a.DesiredStatus, a.ClientStatus = "", ""
		return a
	}
	svc := func() *fsmpb.JobSpec {
		s := filled(&fsmpb.JobSpec{}, &n)
		s.Type = "service"
		s.Service.RoutePort = "http"
		return s
	}
	at := func(sec int64) *timestamppb.Timestamp {
		return &timestamppb.Timestamp{Seconds: 1_800_000_000 + sec, Nanos: int32(sec)}
	}
	cmds := []*fsmpb.Command{
		{Cmd: &fsmpb.Command_UpsertNodes{UpsertNodes: &fsmpb.UpsertNodes{Nodes: []*fsmpb.Node{node("n1"), node("n2")}}}},
		{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: "job-a", Spec: spec}}},
		{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: "job-b", Spec: spec}}},
		// Plans expect the job's modify index: job-a was registered at index 2, job-b at 3.
		{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{
			{JobId: "job-a", ExpectModifyIndex: 2, Status: JobRunning, StatusReason: "placed", Generation: 1, Restarts: 1, WorldSize: 2,
				NextAttemptTime: at(100),
				Allocations:     []*fsmpb.Allocation{alloc("a0", "job-a", 0), alloc("a1", "job-a", 1)}},
			{JobId: "job-b", ExpectModifyIndex: 3, Status: JobRunning, Generation: 1, WorldSize: 1,
				Allocations: []*fsmpb.Allocation{alloc("b0", "job-b", 0)}},
		}}}},
		{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{Allocations: []*fsmpb.Allocation{
			func() *fsmpb.Allocation { a := alloc("a0", "job-a", 0); a.ClientStatus = AllocRunning; return a }(),
			func() *fsmpb.Allocation { a := alloc("b0", "job-b", 0); a.ClientStatus = AllocComplete; return a }(),
		}}}},
		{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{
			{JobId: "job-b", ExpectModifyIndex: 4, Status: JobComplete, Generation: 1, WorldSize: 1},
			{JobId: "job-a", ExpectModifyIndex: 4, Status: JobRunning, Generation: 2, WorldSize: 1, EndCause: "node-lost",
				StopAllocIds: []string{"a0"}, LostAllocIds: []string{"a1"},
				Allocations: []*fsmpb.Allocation{func() *fsmpb.Allocation { a := alloc("a2", "job-a", 0); a.Generation = 2; return a }()}},
		}}}},
		{Cmd: &fsmpb.Command_DrainNode{DrainNode: &fsmpb.DrainNode{NodeId: "n2", Deadline: at(200), Reason: "spot notice"}}},
		{Cmd: &fsmpb.Command_PurgeJobs{PurgeJobs: &fsmpb.PurgeJobs{Ids: []string{"job-b"}}}},
		{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: "job-a"}}},
		// v2: a service, its rolling update, and eligibility.
		{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: "svc-c", Spec: svc()}}},
		{Cmd: &fsmpb.Command_UpdateJob{UpdateJob: &fsmpb.UpdateJob{Id: "svc-c", Spec: svc()}}},
		{Cmd: &fsmpb.Command_NodeEligibility{NodeEligibility: &fsmpb.NodeEligibility{NodeId: "n1", Eligible: false}}},
		// v4: allocation GC removes a1 (lost, told to stop, generation 1 of
		// a job at 2) and neither a0 (its client status is not final) nor
		// a2 (the current generation).
		{Cmd: &fsmpb.Command_PurgeAllocations{PurgeAllocations: &fsmpb.PurgeAllocations{Ids: []string{"a0", "a1", "a2", "missing"}}}},
	}
	for i, c := range cmds {
		c.Time = at(int64(i))
	}
	return cmds
}

// TestWriteFSMGolden writes the golden file; run it only on the build whose
// format it records: GPUMESH_WRITE_GOLDEN=1 go test -run TestWriteFSMGolden ./consensus
func TestWriteFSMGolden(t *testing.T) {
	if os.Getenv("GPUMESH_WRITE_GOLDEN") == "" {
		t.Skip("set GPUMESH_WRITE_GOLDEN=1 to rewrite " + goldenPath)
	}
	var g golden
	f := NewFSM(nil)
	for i, c := range goldenCommands() {
		data, err := proto.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		idx := uint64(i + 1)
		if res := f.Apply(&raft.Log{Index: idx, Type: raft.LogCommand, Data: data}); res != nil {
			if err, ok := res.(error); ok {
				t.Fatalf("entry %d: %v", idx, err)
			}
		}
		g.Log = append(g.Log, struct {
			Index uint64 `json:"index"`
			Data  string `json:"data"`
		}{idx, base64.StdEncoding.EncodeToString(data)})
	}
	g.Snapshot = base64.StdEncoding.EncodeToString(snapshotBytes(t, f))
	st := f.State()
	g.State.Index = st.Index()
	js := func(m proto.Message) json.RawMessage {
		b, err := protojson.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, x := range st.Nodes() {
		g.State.Nodes = append(g.State.Nodes, js(x))
	}
	for _, j := range st.Jobs() {
		g.State.Jobs = append(g.State.Jobs, js(j))
		for _, a := range st.Allocations(j.Id) {
			g.State.Allocations = append(g.State.Allocations, js(a))
		}
	}
	if len(g.State.Nodes) != 2 || len(g.State.Jobs) != 2 || len(g.State.Allocations) != 2 {
		t.Fatalf("golden state has %d nodes, %d jobs, %d allocations; want 2, 2, 2", len(g.State.Nodes), len(g.State.Jobs), len(g.State.Allocations))
	}
	out, err := json.MarshalIndent(g, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(goldenPath, append(out, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestReadFSMGolden: this build reads the logs and snapshots written by the
// builds the golden files record, to the same states.
func TestReadFSMGolden(t *testing.T) {
	for _, p := range goldenPaths {
		t.Run(filepath.Base(p), func(t *testing.T) { readFSMGolden(t, p) })
	}
}

func readFSMGolden(t *testing.T, path string) {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var g golden
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	fromLog := NewFSM(nil)
	for _, e := range g.Log {
		data, err := base64.StdEncoding.DecodeString(e.Data)
		if err != nil {
			t.Fatal(err)
		}
		if res := fromLog.Apply(&raft.Log{Index: e.Index, Type: raft.LogCommand, Data: data}); res != nil {
			if err, ok := res.(error); ok {
				t.Fatalf("entry %d: %v", e.Index, err)
			}
		}
	}
	snap, err := base64.StdEncoding.DecodeString(g.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	fromSnap := NewFSM(nil)
	if err := fromSnap.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]*FSM{"log": fromLog, "snapshot": fromSnap} {
		st := f.State()
		if st.Index() != g.State.Index {
			t.Errorf("%s: index %d, want %d", name, st.Index(), g.State.Index)
		}
		check := func(what string, want []json.RawMessage, got []proto.Message, mk func() proto.Message) {
			if len(got) != len(want) {
				t.Fatalf("%s: %d %s, want %d", name, len(got), what, len(want))
			}
			for i := range want {
				w := mk()
				if err := protojson.Unmarshal(want[i], w); err != nil {
					t.Fatal(err)
				}
				if !proto.Equal(got[i], w) {
					t.Errorf("%s: %s %d:\n got %v\nwant %v", name, what, i, got[i], w)
				}
			}
		}
		var nodes, jobs, allocs []proto.Message
		for _, x := range st.Nodes() {
			nodes = append(nodes, x)
		}
		for _, j := range st.Jobs() {
			jobs = append(jobs, j)
			for _, a := range st.Allocations(j.Id) {
				allocs = append(allocs, a)
			}
		}
		check("nodes", g.State.Nodes, nodes, func() proto.Message { return &controlpb.Node{} })
		check("jobs", g.State.Jobs, jobs, func() proto.Message { return &controlpb.Job{} })
		check("allocations", g.State.Allocations, allocs, func() proto.Message { return &controlpb.Allocation{} })
	}
}
