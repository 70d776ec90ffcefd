package procs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// Build directories of exited test processes are removed; those of live
// processes (this one) and names without a pid are kept.
func TestRemoveStaleBinaries(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Skip("no `true` to make an exited pid:", err)
	}
	mk := func(name string) string {
		d := filepath.Join(tmp, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "gpumesh"), []byte("x"), 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	stale := mk(binDirPrefix + strconv.Itoa(dead.Process.Pid) + "-123")
	mine := mk(binDirPrefix + strconv.Itoa(os.Getpid()) + "-456")
	legacy := mk(binDirPrefix + "789")
	removeStaleBinaries()
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("%s (an exited process's) still there: %v", stale, err)
	}
	for _, d := range []string{mine, legacy} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s removed: %v", d, err)
		}
	}
}
