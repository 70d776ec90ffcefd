package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/gpumesh/gpumesh/collective/pipeline"
	"github.com/gpumesh/gpumesh/internal/bytesize"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// printResults shows what the built-in drivers of the job's last generation
// reported, as tables: all-reduce sizes with their bus bandwidth (from rank
// 0), pipeline stages one row each, anything else as key: value lines.
func printResults(out io.Writer, resp *pb.GetJobResponse) {
	var allocs []*pb.Allocation
	for _, al := range resp.Allocations {
		if al.Generation == resp.Job.Generation && al.Result != nil && len(al.Result.GetFields()) > 0 {
			allocs = append(allocs, al)
		}
	}
	if len(allocs) == 0 {
		return
	}
	sort.Slice(allocs, func(i, j int) bool { return allocs[i].Rank < allocs[j].Rank })
	switch resp.Job.Spec.GetType() {
	case "allreduce":
		if printAllReduceResult(out, allocs[0]) {
			return
		}
	case "pipeline":
		if printPipelineResults(out, allocs) {
			return
		}
	}
	printOtherResult(out, allocs[0])
}

func printAllReduceResult(out io.Writer, al *pb.Allocation) bool {
	rows, ok := al.Result.AsMap()["sizes"].([]any)
	if !ok || len(rows) == 0 {
		return false
	}
	fmt.Fprintf(out, "\nall-reduce as rank %d on %s saw it:\n", al.Rank, dash(al.NodeName))
	tw := newTable(out)
	fmt.Fprintln(tw, "SIZE\tTYPE\tTIME(us)\tALGBW(GB/s)\tBUSBW(GB/s)\tCHECK")
	for _, r := range rows {
		row, _ := r.(map[string]any)
		fmt.Fprintf(tw, "%v\t%v\t%v\t%v\t%v\t%v\n", row["size"], row["dtype"], row["time_us"], row["algbw_gbps"], row["busbw_gbps"], row["check"])
	}
	tw.Flush()
	return true
}

func printPipelineResults(out io.Writer, allocs []*pb.Allocation) bool {
	reps := make([]pipeline.Report, 0, len(allocs))
	nodes := make([]string, 0, len(allocs))
	for _, al := range allocs {
		b, err := al.Result.MarshalJSON()
		if err != nil {
			return false
		}
		var r pipeline.Report
		if err := json.Unmarshal(b, &r); err != nil || r.Stages == 0 {
			return false
		}
		reps = append(reps, r)
		nodes = append(nodes, dash(al.NodeName))
	}
	r0 := reps[0]
	fmt.Fprintf(out, "\npipeline: %d stages, schedule %s, %s on %s, %d steps of %d samples in %d micro-batches\n",
		r0.Stages, r0.Schedule, r0.Mode, r0.Device, r0.Steps, r0.BatchSize, r0.MicroBatches)
	tw := newTable(out)
	fmt.Fprintln(tw, "STAGE\tNODE\tLAYERS\tSAMPLES/S\tBUBBLE\tWALL\tSENT\tRECEIVED\tPARAMS")
	var loss *pipeline.Report
	for i, r := range reps {
		ranges := r.LayerRanges
		if len(ranges) == 0 {
			ranges = [][2]int{{r.LayerStart, r.LayerEnd}}
		}
		var layers []string
		for _, lr := range ranges {
			if lr[1]-lr[0] == 1 {
				layers = append(layers, fmt.Sprint(lr[0]))
			} else {
				layers = append(layers, fmt.Sprintf("%d-%d", lr[0], lr[1]-1))
			}
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%.0f\t%.1f%%\t%s\t%s\t%s\t%s\n", r.Stage, nodes[i], strings.Join(layers, ","),
			r.SamplesPerSec, 100*r.Bubble, seconds(r.WallSeconds), bytesize.Format(r.BytesSent), bytesize.Format(r.BytesReceived), r.ParamHash)
		if len(r.Losses) > 0 {
			loss = &reps[i]
		}
	}
	tw.Flush()
	if loss != nil {
		fmt.Fprintf(out, "loss: %.4g after step 1, %.4g after step %d\n", loss.Losses[0], loss.FinalLoss, len(loss.Losses))
	}
	return true
}

// seconds prints a time in seconds with three significant digits and a
// fitting unit ("793µs", "12.3ms", "1.25s").
func seconds(sec float64) string {
	d := time.Duration(sec * float64(time.Second))
	for unit := time.Nanosecond; unit < time.Minute; unit *= 10 {
		if d < 1000*unit {
			return d.Round(unit).String()
		}
	}
	return d.Round(time.Second).String()
}

// printOtherResult prints a result the CLI has no table for, one key per line.
func printOtherResult(out io.Writer, al *pb.Allocation) {
	m := al.Result.AsMap()
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fmt.Fprintf(out, "\nrank %d reported:\n", al.Rank)
	tw := newTable(out)
	for _, k := range keys {
		v, err := json.Marshal(m[k])
		if err != nil {
			v = []byte(fmt.Sprint(m[k]))
		}
		fmt.Fprintf(tw, "  %s\t%s\n", k, v)
	}
	tw.Flush()
}
