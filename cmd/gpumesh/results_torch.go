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
		rows, ok := al.Result.AsMap()["collectives"].([]any)
		if !ok || len(rows) == 0 {
			continue
		}
		if !shown {
			fmt.Fprintln(out, "\ncollectives the ranks ran through their agents (PyTorch backend gpumesh):")
			fmt.Fprintln(tw, "RANK\tNODE\tOP\tCOUNT\tBYTES\tMEAN(ms)\tMAX(ms)")
			shown = true
		}
		for _, r := range rows {
			row, _ := r.(map[string]any)
			b, _ := row["bytes"].(float64)
			fmt.Fprintf(tw, "%d\t%s\t%v\t%v\t%s\t%v\t%v\n", al.Rank, dash(al.NodeName), row["op"], row["ops"], bytesize.Format(int64(b)), row["mean_latency_ms"], row["max_latency_ms"])
		}
	}
	tw.Flush()
	return shown
}
