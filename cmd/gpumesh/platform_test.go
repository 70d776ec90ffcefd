package main

import (
	"bytes"
	"errors"
	"regexp"
	"strings"
	"testing"
)

// On a system where the agent does not run, agent and dev fail before
// their own checks (a bad --log-level would be theirs) with errNeedsLinux,
// whose message names client commands; those work as before.
func TestLinuxOnlyAgentCommandsFailAtOnce(t *testing.T) {
	for _, name := range agentCommands {
		root := newRootCommand()
		linuxOnly(root)
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs([]string{name, "--log-level", "bogus", "--data-dir", t.TempDir() + "/data"})
		err := root.Execute()
		if !errors.Is(err, errNeedsLinux) {
			t.Fatalf("gpumesh %s: got %v, want errNeedsLinux", name, err)
		}
		for _, want := range []string{"gpumesh " + name + " needs Linux", "gpumesh job run, gpumesh job status", "GPUMESH_ADDR"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("gpumesh %s: error lacks %q: %v", name, want, err)
			}
		}
		if out.Len() != 0 {
			t.Errorf("gpumesh %s wrote %q before failing", name, out.String())
		}
	}

	root := newRootCommand()
	linuxOnly(root)
	var help bytes.Buffer
	root.SetOut(&help)
	root.SetArgs([]string{"--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	for _, name := range agentCommands {
		if !regexp.MustCompile(`(?m)^  ` + name + ` .*\(Linux only\)$`).MatchString(help.String()) {
			t.Errorf("gpumesh --help does not mark %s Linux only:\n%s", name, help.String())
		}
	}
	for _, name := range clientCommands {
		c, rest, err := root.Find(strings.Fields(name))
		if err != nil || len(rest) != 0 || c.CommandPath() != "gpumesh "+name || !c.Runnable() {
			t.Errorf("errNeedsLinux names %q, which is not a command (found %v, rest %v, %v)", name, c.CommandPath(), rest, err)
			continue
		}
		if c.PreRunE != nil {
			t.Errorf("linuxOnly changed the client command %q", name)
		}
	}
}
