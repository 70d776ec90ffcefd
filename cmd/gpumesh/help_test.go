package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/gpumesh/gpumesh/deploy"
)

// TestEveryCommandHasAnExample walks the whole command tree: every command
// a person can run or look at has an Example in its --help.
func TestEveryCommandHasAnExample(t *testing.T) {
	root := newRootCommand()
	var walk func(c *cobra.Command)
	n := 0
	walk = func(c *cobra.Command) {
		if c.Hidden || c.Name() == "help" || c.Name() == "completion" || strings.HasPrefix(c.Use, "__") {
			return
		}
		n++
		if strings.TrimSpace(c.Example) == "" {
			t.Errorf("`%s --help` has no Example", c.CommandPath())
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	if n < 10 {
		t.Fatalf("walked only %d commands; is the tree registered?", n)
	}
}

// rawTypeValueName matches value names pflag derives from a flag's Go type
// that mean nothing to a user (int32, uint, stringArray, ...). int, string,
// float, duration and strings read as words and are left alone.
var rawTypeValueName = regexp.MustCompile(`^(u?int(8|16|32|64)|uint|float(32|64)|stringArray|stringTo\w+|\w+Slice|bytes\w*|ip\w*)$`)

// placeholderRE is what a backtick-quoted value name in a usage string must
// look like: an upper-case placeholder such as `ADDR` or `KEY=VALUE`.
var placeholderRE = regexp.MustCompile("`[A-Z][A-Z0-9_=.:,-]*`")

// TestFlagHelpReads walks every command's flags and fails on help text that
// reads wrong: a value name taken from backticks that quote a command
// ("--reason gpumesh nodes"), a raw Go type as the value name ("--rank
// int32"), or two defaults on one line ("(default: from EC2 metadata)
// (default \"unknown\")").
func TestFlagHelpReads(t *testing.T) {
	root := newRootCommand()
	flags := 0
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		check := func(f *pflag.Flag) {
			if f.Hidden {
				return
			}
			flags++
			where := fmt.Sprintf("`%s --%s`", c.CommandPath(), f.Name)
			if strings.Count(f.Usage, "`") != 2*len(placeholderRE.FindAllString(f.Usage, -1)) {
				t.Errorf("%s: usage %q quotes something other than a value placeholder in backticks; pflag takes the first backtick-quoted word as the value name", where, f.Usage)
			}
			name, _ := pflag.UnquoteUsage(f)
			if rawTypeValueName.MatchString(name) {
				t.Errorf("%s: value name %q is a Go type; name the value in the usage with a `PLACEHOLDER`", where, name)
			}
			fs := pflag.NewFlagSet("one", pflag.ContinueOnError)
			fs.AddFlag(f)
			if line := fs.FlagUsages(); strings.Count(line, "(default") > 1 {
				t.Errorf("%s: two defaults on one line: %s", where, strings.TrimSpace(line))
			}
		}
		c.LocalFlags().VisitAll(check)
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	if flags < 50 {
		t.Fatalf("checked only %d flags; is the tree registered?", flags)
	}
}

// readOnlyCommands need no ACL token; their --help must not offer one.
var readOnlyCommands = []string{"members", "nodes", "raft peers", "job status", "job list", "job logs", "job plan"}

func TestReadOnlyCommandsHideToken(t *testing.T) {
	root := newRootCommand()
	for _, path := range readOnlyCommands {
		c, _, err := root.Find(strings.Fields(path))
		if err != nil || c.CommandPath() != "gpumesh "+path {
			t.Errorf("no command %q", path)
			continue
		}
		f := c.Flags().Lookup("token")
		if f == nil {
			continue
		}
		if !f.Hidden {
			t.Errorf("`gpumesh %s --help` offers --token, which a read-only call never needs", path)
		}
	}
	// Mutating commands keep it visible.
	for _, path := range []string{"job run", "job stop", "node drain"} {
		c, _, _ := root.Find(strings.Fields(path))
		if f := c.Flags().Lookup("token"); f == nil || f.Hidden {
			t.Errorf("`gpumesh %s` must offer --token", path)
		}
	}
}

// TestDocsSpellTheClusterTagAsHelpDoes: the README and docs/ write the
// cluster tag key as `--help` and the code do (deploy.ClusterTagKey).
func TestDocsSpellTheClusterTagAsHelpDoes(t *testing.T) {
	files, _ := filepath.Glob("../../docs/*.md")
	files = append(files, "../../README.md")
	wrong := strings.ReplaceAll(deploy.ClusterTagKey, ":", "-")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), wrong) {
			t.Errorf("%s spells the cluster tag %q; the code and --help use %q", p, wrong, deploy.ClusterTagKey)
		}
	}
	root := newRootCommand()
	c, _, _ := root.Find([]string{"ec2", "user-data"})
	if !strings.Contains(c.Example, deploy.ClusterTagKey+"=") {
		t.Errorf("`gpumesh ec2 user-data --help` example does not use %s", deploy.ClusterTagKey)
	}
}
