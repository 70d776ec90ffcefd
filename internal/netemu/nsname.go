package netemu

import (
	"strconv"
	"strings"
)

// NamespaceName is the name of a network namespace made by the test
// process pid: prefix, pid, "-", name (NamespaceName("gmr-", 1234, "n1") is
// "gmr-1234-n1"). Runs side by side never share a namespace, and the
// leftovers of a killed run can be told from a live run's (StaleNamespaces).
func NamespaceName(prefix string, pid int, name string) string {
	return prefix + strconv.Itoa(pid) + "-" + name
}

// StaleNamespaces picks, from names (as `ip netns list` prints them), the
// namespaces named with prefix whose creating process no longer runs
// (alive(pid) is false for the pid NamespaceName put in the name): those a
// killed run left behind. A name with the prefix but no pid (runs before
// names carried one) is stale too; names without the prefix are never
// picked. A pid reused by an unrelated process keeps its namespaces until
// that process ends, which errs on the side of not deleting.
func StaleNamespaces(names []string, prefix string, alive func(pid int) bool) []string {
	var stale []string
	for _, n := range names {
		rest, ok := strings.CutPrefix(n, prefix)
		if !ok {
			continue
		}
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 || !alive(pid) {
			stale = append(stale, n)
		}
	}
	return stale
}
