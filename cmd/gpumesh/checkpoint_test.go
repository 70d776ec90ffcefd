package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The checkpoint commands run as their --help examples show: put's output
// saved and joined into commit's --parts; get of a step that has no
// checkpoint says so and where to look.
func TestCheckpointCommandsRunAsTheirExamplesSay(t *testing.T) {
	dir := t.TempDir()
	uri := "file://" + filepath.Join(dir, "ckpt")
	var parts []string
	for rank, data := range []string{"a\n", "bb\n"} {
		file := filepath.Join(dir, "state.pt")
		if err := os.WriteFile(file, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := runCLI(t, "checkpoint", "put", "--uri", uri, "--step", "120", "--rank", []string{"0", "1"}[rank], file)
		if err != nil {
			t.Fatalf("put rank %d: %v", rank, err)
		}
		parts = append(parts, strings.TrimRight(out, "\n")) // what $(cat part-N.json) gives
	}
	if _, err := runCLI(t, "checkpoint", "commit", "--uri", uri, "--step", "120", "--world", "2",
		"--parts", "["+strings.Join(parts, ",")+"]", "--meta", "epoch=3"); err != nil {
		t.Fatalf("commit: %v", err)
	}
	got := filepath.Join(dir, "got.pt")
	if _, err := runCLI(t, "checkpoint", "get", "--uri", uri, "--step", "120", "--rank", "1", got); err != nil {
		t.Fatalf("get: %v", err)
	}
	if b, err := os.ReadFile(got); err != nil || string(b) != "bb\n" {
		t.Fatalf("get wrote %q, %v", b, err)
	}
	_, err := runCLI(t, "checkpoint", "get", "--uri", uri, "--step", "7", "--rank", "0", got)
	if err == nil || !strings.Contains(err.Error(), "no complete checkpoint of step 7 under "+uri) ||
		!strings.Contains(err.Error(), "gpumesh checkpoint list --uri "+uri) {
		t.Fatalf("get of a step with no checkpoint: %v", err)
	}
}
