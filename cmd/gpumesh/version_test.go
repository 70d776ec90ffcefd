package main

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

// A binary without a stamped commit (go run, go test) reads it from its
// source tree: `version` prints the commit HEAD is at.
func TestVersionPrintsCommit(t *testing.T) {
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Skipf("not in a git checkout: %v", err)
	}
	var out bytes.Buffer
	root := newRootCommand()
	root.SetOut(&out)
	root.SetArgs([]string{"version"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	want := "commit   " + strings.TrimSpace(string(head))
	if !strings.Contains(out.String(), want) {
		t.Fatalf("version printed:\n%s\nwant a line starting %q", out.String(), want)
	}
}

func TestWriteVersion(t *testing.T) {
	for _, tc := range []struct {
		b    buildInfo
		want string
	}{
		{buildInfo{Commit: "abc123", Time: "2026-12-07T05:00:00Z", From: "binary", Go: "go1.26"}, "commit   abc123, 2026-12-07T05:00:00Z\n"},
		{buildInfo{Commit: "abc123", Modified: true, From: "binary", Go: "go1.26"}, "commit   abc123 (modified)\n"},
		{buildInfo{Go: "go1.26"}, "commit   unknown"},
	} {
		var out bytes.Buffer
		writeVersion(&out, tc.b)
		if !strings.Contains(out.String(), tc.want) {
			t.Errorf("%+v printed:\n%s\nwant %q", tc.b, out.String(), tc.want)
		}
	}
}
