package main

import (
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// An agent that answered with "node X is down" is not "no agent answers".
func TestExplainKeepsAgentsWordsOnNodeDown(t *testing.T) {
	f := &clientFlags{address: "127.0.0.2:7947"}
	st, err := status.New(codes.Unavailable, "node n3 (abc), which ran rank 1 of job j, is down: its logs are kept on that node and come back with it").
		WithDetails(&errdetails.ErrorInfo{Reason: "NODE_DOWN", Domain: "gpumesh"})
	if err != nil {
		t.Fatal(err)
	}
	got := f.explain(st.Err()).Error()
	if !strings.HasPrefix(got, "node n3 (abc)") || strings.Contains(got, "no gpumesh agent answers") {
		t.Fatalf("explain: %s", got)
	}
	// A dial failure to --address still says so.
	got = f.explain(status.Error(codes.Unavailable, "connection error: dial tcp 127.0.0.2:7947: connect: connection refused")).Error()
	if !strings.Contains(got, "no gpumesh agent answers at 127.0.0.2:7947") {
		t.Fatalf("explain: %s", got)
	}
}
