package main

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// The commands gpumesh dev suggests run in the shell it was started from:
// ./gpumesh after `go build -o gpumesh`, go run under go run, and the bare
// name only when PATH finds this very binary.
func TestSelfCommand(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "gpumesh")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "gpumesh")
	if err := os.WriteFile(other, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	found := func(p string) func(string) (string, error) {
		return func(string) (string, error) { return p, nil }
	}
	none := func(string) (string, error) { return "", errors.New("not found") }
	cases := []struct {
		argv0 string
		look  func(string) (string, error)
		want  string
	}{
		{"gpumesh", none, "gpumesh"},
		{"./gpumesh", none, "./gpumesh"},
		{"bin/gpumesh", found(other), "bin/gpumesh"},
		{"/tmp/go-build1234/b001/exe/gpumesh", found(other), "go run ./cmd/gpumesh"},
		{bin, found(bin), "gpumesh"},
		{bin, found(other), bin},
		{bin, none, bin},
	}
	for _, c := range cases {
		if got := selfCommand(c.argv0, c.look); got != c.want {
			t.Errorf("selfCommand(%q) = %q, want %q", c.argv0, got, c.want)
		}
	}
}
