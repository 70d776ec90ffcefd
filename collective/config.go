package collective

import (
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Config tunes a Communicator. Every rank of a group must use the same
// Channels, ChunkBytes, MinChannelBytes and SmallBytes (a difference is reported as a
// mismatch on the first operation).
type Config struct {
	// Channels is the number of parallel links (each its own TCP lane or
	// HTTP/2 connection with DataPlaneGRPC) to each peer. A buffer is
	// split across channels; each runs its own pipelined ring. An
	// operation too small to give every channel MinChannelBytes of each
	// ring block (of the whole buffer for broadcast and send) uses fewer,
	// at least one. Default 4.
	Channels int
	// ChunkBytes is the pipelining unit in bytes: a channel's part of a
	// block moves in chunks of at most this size, several in flight.
	// Default 1 MiB; 4 KiB to 64 MiB.
	ChunkBytes int
	// MinChannelBytes overrides MinChannelBytes, the least an operation
	// gives each channel (fewer channels for smaller operations): device
	// buffers pay driver calls per frame and may run faster on fewer,
	// larger frames. 0: MinChannelBytes (128 KiB); else 4 KiB to 64 MiB.
	MinChannelBytes int
	// SmallBytes: operations on at most this many bytes use recursive
	// doubling (log2 n rounds) instead of the ring (2(n-1) rounds).
	// Default 64 KiB; 0 disables recursive doubling.
	SmallBytes int
	// Timeout fails an operation that has made no progress (no chunk sent or
	// received) for this long: a dead, hung, unreachable or late peer. Every
	// rank then returns an error wrapping ErrTimeout or ErrPeerFailed.
	// Default 30 s (the node's --collective-timeout).
	Timeout time.Duration
	// AbortTimeout bounds telling peers about a failure. Default 2 s.
	AbortTimeout time.Duration
	// NoSameHost keeps every AllReduce on the network even where all ranks
	// are processes of one host and their buffers offer a same-host ring
	// (SameHostReducer: CUDA IPC for device buffers). Default false. Every
	// rank must use the same value.
	NoSameHost bool
	// NoSameProcess keeps AllReduce on the ring where every rank is in this
	// process (one agent's ranks, an in-process group) instead of each rank
	// reducing its block of every rank's host buffer in place
	// (sameprocess.go). Default false. Every rank must use the same value.
	NoSameProcess bool
	// SameProcessWorkers is how many goroutines the ranks of one process
	// use together for one such AllReduce (each rank SameProcessWorkers/n,
	// fewer for small buffers: at least 512 KiB each). Default 0:
	// GOMAXPROCS.
	SameProcessWorkers int
	// Logger receives structured logs; nil means no logging.
	Logger hclog.Logger
}

// DefaultConfig returns the defaults, tuned for a few parallel TCP flows.
func DefaultConfig() Config {
	return Config{
		Channels:     4,
		ChunkBytes:   1 << 20,
		SmallBytes:   64 << 10,
		Timeout:      30 * time.Second,
		AbortTimeout: 2 * time.Second,
	}
}

// Validate checks the fields against each other.
func (c Config) Validate() error {
	switch {
	case c.Channels < 1 || c.Channels > 64:
		return fmt.Errorf("%w: collective config: channels must be 1..64, got %d", ErrBadArgument, c.Channels)
	case c.ChunkBytes < 4<<10 || c.ChunkBytes > MaxFrameBytes:
		return fmt.Errorf("%w: collective config: chunk size must be 4KiB..64MiB, got %d bytes", ErrBadArgument, c.ChunkBytes)
	case c.MinChannelBytes != 0 && (c.MinChannelBytes < 4<<10 || c.MinChannelBytes > MaxFrameBytes):
		return fmt.Errorf("%w: collective config: minimum bytes per channel must be 0 (the default) or 4KiB..64MiB, got %d", ErrBadArgument, c.MinChannelBytes)
	case c.SmallBytes < 0 || c.SmallBytes > MaxFrameBytes:
		return fmt.Errorf("%w: collective config: small-message threshold must be 0..64MiB, got %d bytes", ErrBadArgument, c.SmallBytes)
	case c.Timeout <= 0:
		return fmt.Errorf("%w: collective config: timeout must be > 0, got %v", ErrBadArgument, c.Timeout)
	case c.AbortTimeout <= 0:
		return fmt.Errorf("%w: collective config: abort timeout must be > 0, got %v", ErrBadArgument, c.AbortTimeout)
	case c.SameProcessWorkers < 0:
		return fmt.Errorf("%w: collective config: same-process workers must be >= 0 (0: GOMAXPROCS), got %d", ErrBadArgument, c.SameProcessWorkers)
	}
	return nil
}

// Group identifies one rank of one communicator.
type Group struct {
	// Job and Generation key the group. Every re-placement of a job bumps
	// its generation; traffic of other generations is refused.
	Job        string
	Generation uint64
	// Rank is this rank; Addrs[i] is the "host:port" of the node serving
	// rank i (the node's RPC port). len(Addrs) is the group size.
	Rank  int
	Addrs []string
}

// Validate checks the group.
func (g Group) Validate() error {
	switch {
	case g.Job == "":
		return fmt.Errorf("%w: group: job ID is empty", ErrBadArgument)
	case len(g.Addrs) < 1:
		return fmt.Errorf("%w: group: needs at least one rank address", ErrBadArgument)
	case g.Rank < 0 || g.Rank >= len(g.Addrs):
		return fmt.Errorf("%w: group: rank %d outside 0..%d", ErrBadArgument, g.Rank, len(g.Addrs)-1)
	}
	return nil
}
