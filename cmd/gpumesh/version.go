package main

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/node"
)

func init() { registerCommand(newVersionCommand) }

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the gpumesh version and the commit it was built from",
		Long: `Print the version, the commit the binary was built from (with "modified" when
the tree had uncommitted changes), the Go version and whether the CUDA data path
is built in. go build stamps the commit into the binary; go run does not, so a
binary built by go run reads it from its source tree with git.`,
		Example: "  gpumesh version",
		Args:    cobra.NoArgs,
		Run: func(cmd *cobra.Command, args []string) {
			writeVersion(cmd.OutOrStdout(), readBuild())
		},
	}
}

// buildInfo is what `gpumesh version` reports.
type buildInfo struct {
	Commit   string // full hash, or "" when unknown
	Time     string // commit time (RFC 3339), or ""
	Modified bool   // the tree had uncommitted changes
	From     string // where Commit came from: "binary" or the source tree's path
	Go       string
}

func writeVersion(w io.Writer, b buildInfo) {
	fmt.Fprintf(w, "gpumesh %s\n", node.Version)
	switch {
	case b.Commit == "":
		fmt.Fprintln(w, "commit   unknown (built outside a git checkout, or with -buildvcs=false)")
	default:
		c := b.Commit
		if b.Modified {
			c += " (modified)"
		}
		if b.Time != "" {
			c += ", " + b.Time
		}
		if b.From != "binary" {
			c += ", read from " + b.From
		}
		fmt.Fprintf(w, "commit   %s\n", c)
	}
	fmt.Fprintf(w, "go       %s %s/%s\n", b.Go, runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(w, "cuda     %v (the CUDA data path is built in: go build -tags cuda)\n", node.CUDABuild)
}

// readBuild reads the commit stamped into the binary (go build), or, for a
// binary that has none (go run), from the git checkout its sources are in.
func readBuild() buildInfo {
	b := buildInfo{Go: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				b.Commit, b.From = s.Value, "binary"
			case "vcs.time":
				b.Time = s.Value
			case "vcs.modified":
				b.Modified = s.Value == "true"
			}
		}
	}
	if b.Commit != "" {
		return b
	}
	// go run: the compiler recorded this file's absolute path (unless
	// -trimpath); ask git there, briefly.
	_, file, _, ok := runtime.Caller(0)
	if !ok || !filepath.IsAbs(file) {
		return b
	}
	dir := filepath.Dir(file)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "git", "-C", dir, "log", "-1", "--format=%H %cI").Output()
	f := strings.Fields(string(out))
	if err != nil || len(f) != 2 {
		return b
	}
	b.Commit, b.Time, b.From = f[0], f[1], "the source tree at "+dir
	if st, err := exec.CommandContext(ctx, "git", "-C", dir, "status", "--porcelain", "--untracked-files=no").Output(); err == nil {
		b.Modified = len(strings.TrimSpace(string(st))) > 0
	}
	return b
}
