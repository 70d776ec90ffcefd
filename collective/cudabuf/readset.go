package cudabuf

import "unsafe"

// readKey names a read by its element range.
type readKey struct{ off, n int }

// readSet records the staging slots lent out by ReadChunk until ReleaseChunk
// gives each back. Several reads of one range can be outstanding at once
// (the same chunk sent to two peers, or read by an in-process peer while it
// is also being sent), and their releases may come in any order, so a
// release names its read by the bytes ReadChunk returned (collective.Buffer's
// contract): take returns exactly that read's slot, never another read's
// still being sent. S is the slot type (a pointer in the cuda build; any
// type in tests). A readSet is not safe for concurrent use: its owner guards
// it (Buffer.mu).
type readSet[S any] struct {
	m map[readKey][]lentRead[S]
}

// lentRead is one outstanding read: its slot and the first byte of the
// memory handed out (unsafe.SliceData of the returned slice, so a read of
// zero elements is named too).
type lentRead[S any] struct {
	base *byte
	slot S
}

// add records that data (backed by slot) was returned for [off, off+n).
func (r *readSet[S]) add(off, n int, data []byte, slot S) {
	if r.m == nil {
		r.m = map[readKey][]lentRead[S]{}
	}
	k := readKey{off, n}
	r.m[k] = append(r.m[k], lentRead[S]{base: unsafe.SliceData(data), slot: slot})
}

// take removes and returns the slot of the read of [off, off+n) that
// returned data; ok is false when there is none (a release without its read,
// or with other bytes than the read returned: a caller's bug, and nothing is
// given back rather than the wrong slot).
func (r *readSet[S]) take(off, n int, data []byte) (slot S, ok bool) {
	k := readKey{off, n}
	l := r.m[k]
	base := unsafe.SliceData(data)
	for i, e := range l {
		if e.base != base {
			continue
		}
		slot = e.slot
		if len(l) == 1 {
			delete(r.m, k)
		} else {
			copy(l[i:], l[i+1:])
			l[len(l)-1] = lentRead[S]{}
			r.m[k] = l[:len(l)-1]
		}
		return slot, true
	}
	return slot, false
}
