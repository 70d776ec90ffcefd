package pipeline

import "sync"

// freeList keeps reusable items (device memory, pinned host buffers,
// events) by key (a size, a kind), handed out last in, first out. Safe for
// concurrent use.
type freeList[K comparable, T any] struct {
	mu   sync.Mutex
	free map[K][]T
}

// get returns a free item of key k, or one made by mk when none is free.
func (f *freeList[K, T]) get(k K, mk func() (T, error)) (T, error) {
	if v, ok := f.pop(k); ok {
		return v, nil
	}
	return mk()
}

// pop takes a free item of key k, if there is one.
func (f *freeList[K, T]) pop(k K) (T, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.free[k]
	if len(l) == 0 {
		var zero T
		return zero, false
	}
	v := l[len(l)-1]
	var zero T
	l[len(l)-1] = zero
	f.free[k] = l[:len(l)-1]
	return v, true
}

// put gives v back under key k.
func (f *freeList[K, T]) put(k K, v T) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.free == nil {
		f.free = map[K][]T{}
	}
	f.free[k] = append(f.free[k], v)
}

// drain empties the list and returns what was free (to release it).
func (f *freeList[K, T]) drain() []T {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []T
	for _, l := range f.free {
		out = append(out, l...)
	}
	f.free = nil
	return out
}
