package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/node/driver"
)

func TestChunkStamps(t *testing.T) {
	st := func(offs ...int64) []driver.LogStamp {
		var out []driver.LogStamp
		for _, o := range offs {
			out = append(out, driver.LogStamp{Offset: o, Time: time.Unix(0, o)})
		}
		return out
	}
	for _, tc := range []struct {
		stamps         []driver.LogStamp
		from, to       int64
		sent, keptFrom string
	}{
		{st(0, 10, 20), 12, 25, "[10 20]", "[20]"}, // the one before, the one inside
		{st(0, 10, 20), 10, 20, "[10]", "[10 20]"}, // a stamp at the end belongs to the next chunk
		{st(30), 10, 20, "[]", "[30]"},             // none yet for these bytes
		{nil, 0, 5, "[]", "[]"},
	} {
		sent, kept := chunkStamps(tc.stamps, tc.from, tc.to)
		var so, ko []int64
		for _, s := range sent {
			so = append(so, s.Offset)
		}
		for _, k := range kept {
			ko = append(ko, k.Offset)
		}
		if fmt.Sprint(so) != tc.sent || fmt.Sprint(ko) != tc.keptFrom {
			t.Errorf("chunkStamps(%v, %d, %d) sent %v kept %v, want %s and %s", tc.stamps, tc.from, tc.to, so, ko, tc.sent, tc.keptFrom)
		}
	}
}
