package collective

// abstractUnixNames is true where a Unix socket name starting with '@' is
// in the abstract namespace (no file): Linux.
const abstractUnixNames = true
