package pipeline

import (
	"errors"
	"testing"
)

func TestFreeListLastInFirstOutByKey(t *testing.T) {
	var f freeList[int, string]
	made := 0
	mk := func() (string, error) { made++; return "new", nil }
	if v, err := f.get(1, mk); err != nil || v != "new" || made != 1 {
		t.Fatalf("get from empty list = %q, %v (made %d), want a new item", v, err, made)
	}
	f.put(1, "a")
	f.put(1, "b")
	f.put(2, "c")
	for _, want := range []string{"b", "a"} {
		if v, _ := f.get(1, mk); v != want {
			t.Fatalf("get(1) = %q, want %q", v, want)
		}
	}
	if made != 1 {
		t.Fatalf("made %d items while free ones were there", made)
	}
	if _, ok := f.pop(1); ok {
		t.Fatal("pop of an emptied key found an item")
	}
	failing := errors.New("no memory")
	if _, err := f.get(3, func() (string, error) { return "", failing }); !errors.Is(err, failing) {
		t.Fatalf("get's make error = %v, want %v", err, failing)
	}
	if d := f.drain(); len(d) != 1 || d[0] != "c" {
		t.Fatalf("drain = %v, want [c]", d)
	}
	if _, ok := f.pop(2); ok {
		t.Fatal("drained list still hands out items")
	}
}
