package collective

import (
	"sync"

	"google.golang.org/grpc/mem"
)

// dirtyPool is the gRPC buffer pool of the data plane: like gRPC's default
// tiered pool, but it does not zero buffers on reuse (every received byte
// is overwritten by the read that fills it), which saves a pass over all
// received data.
type dirtyPool struct {
	tiers [len(dirtyTierSizes)]sync.Pool
}

var dirtyTierSizes = [...]int{256, 4 << 10, 16 << 10, 32 << 10, 256 << 10, 1 << 20, 4 << 20}

var _ mem.BufferPool = (*dirtyPool)(nil)

func newDirtyPool() *dirtyPool { return &dirtyPool{} }

func dirtyTier(size int) int {
	for i, s := range dirtyTierSizes {
		if size <= s {
			return i
		}
	}
	return -1
}

// Get implements mem.BufferPool.
func (p *dirtyPool) Get(size int) *[]byte {
	t := dirtyTier(size)
	if t < 0 {
		b := make([]byte, size)
		return &b
	}
	if v, ok := p.tiers[t].Get().(*[]byte); ok {
		*v = (*v)[:size]
		return v
	}
	b := make([]byte, size, dirtyTierSizes[t])
	return &b
}

// Put implements mem.BufferPool.
func (p *dirtyPool) Put(b *[]byte) {
	c := cap(*b)
	t := dirtyTier(c)
	if t < 0 || dirtyTierSizes[t] != c {
		return
	}
	p.tiers[t].Put(b)
}

var sharedDirtyPool = newDirtyPool()
