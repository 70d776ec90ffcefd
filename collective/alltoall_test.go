package collective

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// a2aLen is the length of rank r's block for rank p: uneven, some empty.
func a2aLen(r, p int) int { return ((r*3 + p*5 + 1) % 4) * 1500 }

// a2aValue is element i of rank r's block for rank p.
func a2aValue(r, p, i int) float64 { return float64((r*31 + p*7 + i) % 97) }

// AllToAll, Gather and Scatter move every block to its place, with uneven
// and empty blocks, on the ring transport, the same-process path and TCP
// lanes; several in a row keep their order with the other collectives.
func TestAllToAllGatherScatter(t *testing.T) {
	const n = 4
	for _, tc := range []struct {
		name string
		open func() ([]*Communicator, func(), error)
	}{
		{"local", func() ([]*Communicator, func(), error) {
			_, comms, err := NewLocalGroup("a2a", 1, n, testConfig())
			return comms, func() { CloseAll(comms) }, err
		}},
		{"same-process", func() ([]*Communicator, func(), error) {
			cfg := testConfig()
			cfg.NoSameProcess = false
			_, comms, err := NewLocalGroup("a2a", 1, n, cfg)
			return comms, func() { CloseAll(comms) }, err
		}},
		{"loopback", func() ([]*Communicator, func(), error) {
			g, err := NewLoopbackGroup("a2a", 1, n, testConfig(), DefaultNetConfig())
			if err != nil {
				return nil, nil, err
			}
			return g.Comms, g.Close, nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			comms, closeAll, err := tc.open()
			if err != nil {
				t.Fatal(err)
			}
			defer closeAll()
			for round := range 2 {
				sends := make([][]Buffer, n)
				recvs := make([][]Buffer, n)
				for r := range n {
					sends[r], recvs[r] = make([]Buffer, n), make([]Buffer, n)
					for p := range n {
						b := NewHostBuffer(Float32, a2aLen(r, p))
						for i := range b.Len() {
							b.Set(i, a2aValue(r, p, i))
						}
						sends[r][p] = b
						recvs[r][p] = NewHostBuffer(Float32, a2aLen(p, r))
					}
				}
				noErrs(t, RunAll(comms, func(c *Communicator) error {
					if err := c.AllToAll(context.Background(), sends[c.Rank()], recvs[c.Rank()]); err != nil {
						return err
					}
					// Another collective between two exchanges.
					return c.Barrier(context.Background())
				}))
				for r := range n {
					for p := range n {
						if p == r {
							continue
						}
						got := recvs[r][p].(*HostBuffer)
						for i := range got.Len() {
							if got.At(i) != a2aValue(p, r, i) {
								t.Fatalf("round %d: rank %d's block from rank %d: element %d is %v, want %v", round, r, p, i, got.At(i), a2aValue(p, r, i))
							}
						}
					}
				}
			}
			for root := range n {
				blocks := make([]*HostBuffer, n)
				gathered := make([]Buffer, n)
				scattered := make([]*HostBuffer, n)
				for r := range n {
					blocks[r] = NewHostBuffer(Int64, 3001)
					for i := range 3001 {
						blocks[r].Set(i, a2aValue(r, root, i))
					}
					gathered[r] = NewHostBuffer(Int64, 3001)
					scattered[r] = NewHostBuffer(Int64, 3001)
				}
				noErrs(t, RunAll(comms, func(c *Communicator) error {
					if err := c.Gather(context.Background(), blocks[c.Rank()], gathered, root); err != nil {
						return err
					}
					var sl []Buffer
					if c.Rank() == root {
						sl = []Buffer{blocks[0], blocks[1], blocks[2], blocks[3]}
					}
					return c.Scatter(context.Background(), sl, scattered[c.Rank()], root)
				}))
				for r := range n {
					if r == root {
						continue
					}
					g, s := gathered[r].(*HostBuffer), scattered[r]
					for i := range 3001 {
						if g.At(i) != a2aValue(r, root, i) || s.At(i) != a2aValue(r, root, i) {
							t.Fatalf("root %d: rank %d's block element %d: gathered %v, scattered %v, want %v", root, r, i, g.At(i), s.At(i), a2aValue(r, root, i))
						}
					}
				}
			}
		})
	}
}

// A rank that receives a block it disagrees on fails with a mismatch that
// names both operations, not at the timeout, and the others' communicators
// fail too: a length, an all-to-all against a gather.
func TestAllToAllMismatch(t *testing.T) {
	const n = 3
	empty := func(c *Communicator, lens func(p int) int) ([]Buffer, []Buffer) {
		s, r := make([]Buffer, n), make([]Buffer, n)
		for p := range n {
			s[p], r[p] = NewHostBuffer(Float32, lens(p)), NewHostBuffer(Float32, 10)
		}
		return s, r
	}
	for _, tc := range []struct {
		name string
		call func(c *Communicator) error
		want string
		rank int // the rank that receives the mismatching frame
	}{
		{"length", func(c *Communicator) error {
			s, r := empty(c, func(p int) int {
				if c.Rank() == 0 && p == 1 {
					return 11
				}
				return 10
			})
			return c.AllToAll(context.Background(), s, r)
		}, "AllToAll(float32, count=11", 1},
		{"operation", func(c *Communicator) error {
			if c.Rank() == 0 {
				s, r := empty(c, func(int) int { return 10 })
				return c.AllToAll(context.Background(), s, r)
			}
			return c.Gather(context.Background(), NewHostBuffer(Float32, 10), nil, 0)
		}, "Gather(float32", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, comms, err := NewLocalGroup("a2a-mismatch", 1, n, testConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer CloseAll(comms)
			errs := RunAll(comms, tc.call)
			if err := errs[tc.rank]; !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("rank %d: %v, want a mismatch mentioning %q", tc.rank, err, tc.want)
			}
			// The others' transfers may have completed before; their
			// communicators fail all the same (the abort reaches them).
			for _, c := range comms {
				poll.Until(t, 10*time.Second, func() error {
					if c.Err() == nil {
						return fmt.Errorf("rank %d's communicator did not fail", c.Rank())
					}
					return nil
				})
			}
		})
	}
}

// Bad arguments are refused before anything is sent.
func TestAllToAllBadArguments(t *testing.T) {
	_, comms, err := NewLocalGroup("a2a-bad", 1, 2, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	c := comms[0]
	one := []Buffer{NewHostBuffer(Float32, 1)}
	for name, err := range map[string]error{
		"lists":   c.AllToAll(context.Background(), one, one),
		"dtypes":  c.AllToAll(context.Background(), []Buffer{nil, NewHostBuffer(Float32, 1)}, []Buffer{nil, NewHostBuffer(Int32, 1)}),
		"nil":     c.AllToAll(context.Background(), []Buffer{nil, nil}, []Buffer{nil, NewHostBuffer(Int32, 1)}),
		"root":    c.Gather(context.Background(), one[0], nil, 2),
		"scatter": c.Scatter(context.Background(), one, one[0], 0),
	} {
		if !errors.Is(err, ErrBadArgument) && !errors.Is(err, ErrBadDType) {
			t.Errorf("%s: %v, want a bad argument", name, err)
		}
	}
	if err := c.Err(); err != nil {
		t.Fatalf("a refused call failed the communicator: %v", err)
	}
}
