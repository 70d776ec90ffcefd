package cuda

import "fmt"

// Config says which devices to open and how much pinned host memory to take.
type Config struct {
	// Devices lists the device ordinals to open; nil or empty opens all.
	Devices []int
	// PinnedSlotBytes is the size of one pinned host buffer of the pool, in
	// bytes: the largest chunk a copy stream moves at once. Default 4 MiB.
	PinnedSlotBytes int
	// PinnedSlots is how many pinned buffers the pool allocates once, at
	// Open. Default 64 (256 MiB with the default slot size).
	PinnedSlots int
}

// DefaultConfig opens every device with a 64 × 4 MiB pinned pool.
func DefaultConfig() Config {
	return Config{PinnedSlotBytes: 4 << 20, PinnedSlots: 64}
}

// Validate checks the config.
func (c Config) Validate() error {
	if c.PinnedSlotBytes < 4096 || c.PinnedSlotBytes%4096 != 0 {
		return fmt.Errorf("%w: config: PinnedSlotBytes must be a positive multiple of 4096, got %d", ErrBadArgument, c.PinnedSlotBytes)
	}
	if c.PinnedSlots < 1 {
		return fmt.Errorf("%w: config: PinnedSlots must be >= 1, got %d", ErrBadArgument, c.PinnedSlots)
	}
	seen := map[int]bool{}
	for _, d := range c.Devices {
		if d < 0 {
			return fmt.Errorf("%w: config: device ordinal must be >= 0, got %d", ErrBadArgument, d)
		}
		if seen[d] {
			return fmt.Errorf("%w: config: device %d listed twice", ErrBadArgument, d)
		}
		seen[d] = true
	}
	return nil
}
