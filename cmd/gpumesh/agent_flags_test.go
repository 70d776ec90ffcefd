package main

import (
	"strings"
	"testing"
)

// --alloc-gc-keep takes a count of at least 1 (default consensus's 3) and
// says what is wrong with anything else; --help explains it.
func TestAgentAllocGCKeepFlag(t *testing.T) {
	for _, c := range []struct {
		arg, want, err string
	}{
		{"", "3", ""},
		{"1", "1", ""},
		{"10", "10", ""},
		{"0", "", "must be at least 1"},
		{"-2", "", "must be at least 1"},
		{"three", "", "not a whole number"},
	} {
		cmd := newAgentCommand()
		args := []string{}
		if c.arg != "" {
			args = append(args, "--alloc-gc-keep", c.arg)
		}
		err := cmd.Flags().Parse(args)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), "alloc-gc-keep") {
				t.Errorf("--alloc-gc-keep %q: error %v, want one naming the flag and saying %q", c.arg, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("--alloc-gc-keep %q: %v", c.arg, err)
			continue
		}
		if got := cmd.Flags().Lookup("alloc-gc-keep").Value.String(); got != c.want {
			t.Errorf("--alloc-gc-keep %q: value %s, want %s", c.arg, got, c.want)
		}
	}
	usage := newAgentCommand().Flags().FlagUsages()
	if !strings.Contains(usage, "--alloc-gc-keep N") || !strings.Contains(usage, "(default 3)") {
		t.Errorf("--help does not explain --alloc-gc-keep N with its default:\n%s", usage)
	}
}
