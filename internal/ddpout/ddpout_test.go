package ddpout

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("rank0.json", `{"rank": 0, "world": 2, "backend": "gpumesh", "losses": [1.5, 0.25], "params": [0.125]}`)
	write("rank1.json", `{"rank": 1, "world": 2, "backend": "gpumesh", "losses": [1.5, 0.25], "params": [0.125]}`)
	out, err := Read(dir, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || out[1].Rank != 1 || out[1].World != 2 || len(out[0].Losses) != 2 || out[0].Losses[1] != 0.25 || out[1].Params[0] != 0.125 {
		t.Fatalf("read %+v", out)
	}
	if _, err := Read(dir, 3); err == nil || !strings.Contains(err.Error(), "rank 2's output") {
		t.Fatalf("a missing rank: %v", err)
	}
	write("rank1.json", `{"rank": 1,`)
	if _, err := Read(dir, 2); err == nil || !strings.Contains(err.Error(), "rank 1's output") {
		t.Fatalf("a torn file: %v", err)
	}
}
