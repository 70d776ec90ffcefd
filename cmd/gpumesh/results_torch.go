package main

import (
	"fmt"
	"io"

	"github.com/gpumesh/gpumesh/internal/bytesize"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// printClientCollectives shows, per rank, the collectives an exec rank ran
// through its agent (the PyTorch backend "gpumesh"), as the agent reported
// them when the rank ended.
func printClientCollectives(out io.Writer, allocs []*pb.Allocation) bool {
	shown := false
	tw := newTable(out) // one table, one header, every rank's rows in it
	for _, al := range allocs {
		rows := clientCollectiveRows(al)
		if len(rows) == 0 {
			continue
		}
		if !shown {
			fmt.Fprintln(out, "\ncollectives the ranks ran through their agents (PyTorch backend gpumesh):")
			fmt.Fprintln(tw, "RANK\tNODE\tOP\tCOUNT\tBYTES\tMEAN(ms)\tMAX(ms)")
			shown = true
		}
		for _, row := range rows {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%v\t%s\t%v\t%v\n", al.Rank, dash(al.NodeName), row.Op, row.Ops, bytesize.Format(int64(row.Bytes)), row.MeanMs, row.MaxMs)
		}
	}
	tw.Flush()
	return shown
}

// clientCollectiveRow is one row of what an agent reports, in a rank's
// allocation result, for the collectives the rank ran through it (node's
// localapi metrics: one row per operation kind).
type clientCollectiveRow struct {
	Op            string
	Ops, Bytes    float64
	MeanMs, MaxMs any // formatted by the agent
}

// clientCollectiveRows reads the rows of al's result; none when it has none.
func clientCollectiveRows(al *pb.Allocation) []clientCollectiveRow {
	rows, _ := al.Result.AsMap()["collectives"].([]any)
	out := make([]clientCollectiveRow, 0, len(rows))
	for _, r := range rows {
		row, _ := r.(map[string]any)
		var c clientCollectiveRow
		c.Op, _ = row["op"].(string)
		c.Ops, _ = row["ops"].(float64)
		c.Bytes, _ = row["bytes"].(float64)
		c.MeanMs, c.MaxMs = row["mean_latency_ms"], row["max_latency_ms"]
		out = append(out, c)
	}
	return out
}
