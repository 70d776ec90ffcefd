//go:build !linux

package collective

// abstractUnixNames is true where a Unix socket name starting with '@' is
// in the abstract namespace (no file): Linux. Elsewhere such a name is a
// file in the working directory, so same-host lanes stay on TCP.
const abstractUnixNames = false
