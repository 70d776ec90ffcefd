//go:build race

package collective

import "sync/atomic"

// laneSync tells the race detector what TCP already guarantees: a frame
// read from a lane was written before. Socket I/O is not annotated for the
// detector on Linux, so two ranks of one process (tests) that order their
// memory accesses through a lane would be reported as racing. Like the
// runtime's ioSync on Windows, every frame write releases into one
// variable and every frame read acquires it.
var laneSync atomic.Uint64

func laneRelease() { laneSync.Add(1) }
func laneAcquire() { laneSync.Load() }
