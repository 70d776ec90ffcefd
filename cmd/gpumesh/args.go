package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"
)

// oneArg is cobra.ExactArgs(1) with an error that says what to give: the
// argument's name from the command's usage line, where to find one (hint,
// may be empty), and the command's first example. Cobra's own
// ("accepts 1 arg(s), received 0") leaves a new user guessing.
func oneArg(hint string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) == 1 {
			return nil
		}
		return argsError(cmd, args, hint)
	}
}

// argsError explains a wrong number of arguments to cmd (see oneArg).
func argsError(cmd *cobra.Command, args []string, hint string) error {
	want := strings.Join(strings.Fields(cmd.Use)[1:], " ")
	got := "none"
	if len(args) > 0 {
		got = fmt.Sprintf("%d (%s)", len(args), strings.Join(args, " "))
	}
	msg := fmt.Sprintf("`%s` takes one argument, %s; got %s", cmd.CommandPath(), want, got)
	if hint != "" {
		msg += " (" + hint + ")"
	}
	if ex, _, _ := strings.Cut(strings.TrimSpace(cmd.Example), "\n"); ex != "" {
		msg += fmt.Sprintf("\nfor example: %s", strings.TrimSpace(ex))
	}
	return fmt.Errorf("%s\n`%s --help` says more", msg, cmd.CommandPath())
}

// hintJobIDs tells where job IDs are listed.
const hintJobIDs = "`gpumesh job list` shows the job IDs"
