package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

func TestAgoUnsetTimesPrintDash(t *testing.T) {
	now := time.Date(2026, 12, 7, 5, 0, 0, 0, time.UTC)
	cases := []struct {
		name string
		t    *timestamppb.Timestamp
		want string
	}{
		{"nil", nil, "-"},
		{"zero message", &timestamppb.Timestamp{}, "-"},
		{"invalid", &timestamppb.Timestamp{Seconds: 1, Nanos: -1}, "-"},
		{"seconds", timestamppb.New(now.Add(-5 * time.Second)), "5s ago"},
		{"minutes", timestamppb.New(now.Add(-3 * time.Minute)), "3m ago"},
		{"hours", timestamppb.New(now.Add(-2 * time.Hour)), "2h ago"},
		{"days", timestamppb.New(now.Add(-72 * time.Hour)), "3d ago"},
		{"future", timestamppb.New(now.Add(time.Minute)), "0s ago"},
	}
	for _, tc := range cases {
		if got := agoAt(tc.t, now); got != tc.want {
			t.Errorf("%s: agoAt = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// A rank that never started has no start time: its STARTED column is "-",
// not hundreds of thousands of hours since 1970.
func TestJobStatusRankNeverStarted(t *testing.T) {
	resp := &pb.GetJobResponse{
		Job: &pb.Job{Id: "hello-1", Status: "pending", Generation: 1, WorldSize: 2, SubmitTime: timestamppb.Now(),
			Spec: &pb.JobSpec{Name: "hello", Type: "exec"}},
		Allocations: []*pb.Allocation{
			{Generation: 1, Rank: 0, NodeName: "node-1", DesiredStatus: "run", ClientStatus: "running", StartTime: timestamppb.Now()},
			{Generation: 1, Rank: 1, NodeName: "node-2", DesiredStatus: "run", ClientStatus: "pending"},
		},
	}
	var out bytes.Buffer
	printJob(&out, resp)
	s := out.String()
	if strings.Contains(s, "h ago") || strings.Contains(s, "d ago") {
		t.Fatalf("an unset start time printed as a long time ago:\n%s", s)
	}
	var rank1 string
	for _, l := range strings.Split(s, "\n") {
		if f := strings.Fields(l); len(f) > 7 && f[0] == "1" && f[1] == "1" {
			rank1 = l
			if f[7] != "-" {
				t.Errorf("STARTED of a rank that never started = %q, want -", f[7])
			}
		}
	}
	if rank1 == "" {
		t.Fatalf("no row for rank 1:\n%s", s)
	}
}
