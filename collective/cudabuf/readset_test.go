package cudabuf

import "testing"

// Two reads of one range outstanding (the same chunk sent to two peers):
// each release must give back its own read's slot, in whichever order the
// sends finish; the slot of a read still being sent must stay lent.
func TestReadSetReleasesTheExactRead(t *testing.T) {
	for _, order := range [][]int{{0, 1, 2}, {2, 1, 0}, {1, 0, 2}, {0, 2, 1}} {
		var rs readSet[int]
		slots := [][]byte{make([]byte, 64), make([]byte, 64), make([]byte, 64)}
		for i, s := range slots {
			rs.add(8, 16, s[:16], i) // slot i backs read i
		}
		for done, i := range order {
			slot, ok := rs.take(8, 16, slots[i][:16])
			if !ok || slot != i {
				t.Fatalf("order %v: releasing read %d gave back slot %d (ok %v), want its own slot %d", order, i, slot, ok, i)
			}
			if got, want := rs.len(), len(slots)-done-1; got != want {
				t.Fatalf("order %v: %d reads outstanding after %d releases, want %d", order, got, done+1, want)
			}
		}
	}
}

// A release that names no outstanding read (other bytes, another range, or
// one already released) gives back nothing rather than another read's slot.
func TestReadSetUnknownReleaseTakesNothing(t *testing.T) {
	var rs readSet[int]
	a, b := make([]byte, 32), make([]byte, 32)
	rs.add(0, 8, a, 1)
	for _, c := range []struct {
		off, n int
		data   []byte
	}{{0, 8, b}, {0, 4, a}, {8, 8, a}, {0, 8, nil}} {
		if slot, ok := rs.take(c.off, c.n, c.data); ok {
			t.Fatalf("take(%d, %d) with bytes of no read gave back slot %d", c.off, c.n, slot)
		}
	}
	if _, ok := rs.take(0, 8, a); !ok {
		t.Fatal("the read's own release found nothing")
	}
	if _, ok := rs.take(0, 8, a); ok {
		t.Fatal("a second release of one read gave back a slot")
	}
	if rs.len() != 0 {
		t.Fatalf("%d reads outstanding, want 0", rs.len())
	}
}

// Reads of zero elements are named by their memory too.
func TestReadSetZeroLengthReads(t *testing.T) {
	var rs readSet[int]
	a, b := make([]byte, 8), make([]byte, 8)
	rs.add(3, 0, a[:0], 1)
	rs.add(3, 0, b[:0], 2)
	if slot, ok := rs.take(3, 0, a[:0]); !ok || slot != 1 {
		t.Fatalf("zero-length release gave back slot %d (ok %v), want 1", slot, ok)
	}
}

// len is (tests) the number of outstanding reads.
func (r *readSet[S]) len() int {
	n := 0
	for _, l := range r.m {
		n += len(l)
	}
	return n
}
