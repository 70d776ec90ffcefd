package netemu

import (
	"slices"
	"testing"
)

// Only namespaces of the suite whose creator is gone are stale: a run in
// progress beside this one keeps its namespaces.
func TestStaleNamespaces(t *testing.T) {
	live := map[int]bool{100: true, 200: true}
	alive := func(pid int) bool { return live[pid] }
	names := []string{
		NamespaceName("gmr-", 100, "hub"), // this run
		NamespaceName("gmr-", 200, "n1"),  // a run beside it
		NamespaceName("gmr-", 300, "hub"), // a killed run
		NamespaceName("gmr-", 300, "n2"),
		"gmr-hub", "gmr-n1", // before names carried the pid
		"gmr-x-n1",            // not a pid
		"gmr-0-n1",            // not a pid either
		"other-300-n1", "lab", // not the suite's
	}
	got := StaleNamespaces(names, "gmr-", alive)
	want := []string{"gmr-300-hub", "gmr-300-n2", "gmr-hub", "gmr-n1", "gmr-x-n1", "gmr-0-n1"}
	if !slices.Equal(got, want) {
		t.Fatalf("stale = %q, want %q", got, want)
	}
	if got := NamespaceName("gmr-", 1234, "n1"); got != "gmr-1234-n1" {
		t.Fatalf("NamespaceName = %q", got)
	}
}
