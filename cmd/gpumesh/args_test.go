package main

import (
	"strings"
	"testing"
)

// A command that takes one argument, run without it (or with two), says
// which argument, where to find one and an example, never cobra's "accepts
// 1 arg(s), received 0".
func TestOneArgErrorSaysWhatToGive(t *testing.T) {
	cases := []struct {
		args []string
		want []string
	}{
		{[]string{"job", "logs"}, []string{"`gpumesh job logs` takes one argument, ID; got none", "`gpumesh job list` shows the job IDs", "for example: gpumesh job logs hello-", "`gpumesh job logs --help`"}},
		{[]string{"job", "stop", "a", "b"}, []string{"`gpumesh job stop` takes one argument, ID; got 2 (a b)"}},
		{[]string{"job", "run"}, []string{"takes one argument, FILE; got none", "- for standard input", "for example: gpumesh job run "}},
		{[]string{"job", "plan"}, []string{"takes one argument, FILE; got none"}},
		{[]string{"service", "status"}, []string{"takes one argument, NAME; got none", "`gpumesh service list` shows the services"}},
		{[]string{"checkpoint", "put"}, []string{"takes one argument, FILE; got none"}},
	}
	for _, c := range cases {
		root := newRootCommand()
		root.SetArgs(c.args)
		var sink strings.Builder
		root.SetOut(&sink)
		root.SetErr(&sink)
		err := root.Execute()
		if err == nil {
			t.Fatalf("gpumesh %s: no error", strings.Join(c.args, " "))
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("gpumesh %s: error lacks %q:\n%v", strings.Join(c.args, " "), w, err)
			}
		}
		if strings.Contains(err.Error(), "arg(s)") {
			t.Errorf("gpumesh %s: cobra's own message: %v", strings.Join(c.args, " "), err)
		}
	}
}
