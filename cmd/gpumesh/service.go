package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

func init() { registerCommand(newServiceCommand) }

func newServiceCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "service",
		Short: "Show services (jobs of type service): replicas, where they listen, their health",
		Long: `Services are jobs of type service. Every agent routes http://NODE:7949/svc/NAME/...
(and its serve port, gpumesh agent --serve, if it has one) to a healthy replica of
NAME; these commands show what the routers route to, where to reach a service, and
which replica slots crash-loop (restart back-off).`,
		Example: "  gpumesh service list\n  gpumesh service status mlp",
	}
	cmd.AddCommand(newServiceListCommand(), newServiceStatusCommand())
	return cmd
}

// serviceJobs returns the live service jobs with their allocations,
// optionally only those named name.
func serviceJobs(cmd *cobra.Command, f *clientFlags, name string) ([]*pb.GetJobResponse, error) {
	return query(cmd, f, func(ctx context.Context, c pb.ControlClient) ([]*pb.GetJobResponse, error) {
		return listServices(ctx, c, name)
	})
}

// listServices returns the live service jobs with their allocations,
// optionally only those named name.
func listServices(ctx context.Context, c pb.ControlClient, name string) ([]*pb.GetJobResponse, error) {
	list, err := c.ListJobs(ctx, &pb.ListJobsRequest{})
	if err != nil {
		return nil, err
	}
	var out []*pb.GetJobResponse
	for _, j := range list.Jobs {
		if j.Spec.GetType() != jobspec.TypeService || consensus.JobTerminal(j.Status) || (name != "" && j.Spec.GetName() != name) {
			continue
		}
		resp, err := c.GetJob(ctx, &pb.GetJobRequest{Id: j.Id})
		if err != nil {
			return nil, err
		}
		out = append(out, resp)
	}
	return out, nil
}

// liveReplicas returns the allocations of a service that run or should.
func liveReplicas(resp *pb.GetJobResponse) []*pb.Allocation {
	var out []*pb.Allocation
	for _, al := range resp.Allocations {
		if al.DesiredStatus == consensus.DesiredRun && !consensus.AllocTerminal(al.ClientStatus) {
			out = append(out, al)
		}
	}
	return out
}

func newServiceListCommand() *cobra.Command {
	var f clientFlags
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List services with their healthy and wanted replicas",
		Example: "  gpumesh service list\n  gpumesh service list --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			jobs, err := serviceJobs(cmd, &f, "")
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if f.json {
				return printJSON(out, &pb.ListJobsResponse{Jobs: jobsOf(jobs)})
			}
			if len(jobs) == 0 {
				fmt.Fprintln(out, "no services (a service is a job with type: service; see examples/service)")
				return nil
			}
			printServiceList(out, jobs, time.Now())
			return nil
		},
	}
	addClientFlags(cmd, &f)
	readOnly(cmd)
	return cmd
}

// printServiceList prints one line per service; STATUS says how many of
// its replica slots crash-loop (consensus.CrashLoopAt failures in a row).
func printServiceList(out io.Writer, jobs []*pb.GetJobResponse, now time.Time) {
	tw := newTable(out)
	fmt.Fprintln(tw, "NAME\tJOB\tSTATUS\tHEALTHY\tREPLICAS\tROUTE")
	for _, r := range jobs {
		healthy := 0
		for _, al := range liveReplicas(r) {
			if al.Health == "healthy" {
				healthy++
			}
		}
		status := r.Job.Status
		looping := 0
		for _, b := range consensus.ServiceBackoffs(r.Job, r.Allocations, now) {
			if b.Failures >= consensus.CrashLoopAt {
				looping++
			}
		}
		if looping > 0 {
			status += fmt.Sprintf(", %d crash-looping", looping)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t/svc/%s/\n", r.Job.Spec.GetName(), r.Job.Id, status, healthy, wantedReplicas(r.Job), r.Job.Spec.GetName())
	}
	tw.Flush()
}

// wantedReplicas is how many replicas the service should run now: for one
// scaled by load, the count the leader last decided (its world size).
func wantedReplicas(j *pb.Job) int32 {
	if j.Spec.GetService().GetMaxReplicas() > 0 && j.WorldSize > 0 {
		return j.WorldSize
	}
	return j.Spec.GetReplicas()
}

// scaleNote says how a service scaled by load scales, "" for another.
func scaleNote(j *pb.Job) string {
	v := j.Spec.GetService()
	if v.GetMaxReplicas() == 0 {
		return ""
	}
	req := "requests"
	if v.GetTargetInFlight() == 1 {
		req = "request"
	}
	return fmt.Sprintf(" (scaled by load: %d to %d, %g %s in flight per replica)", v.GetMinReplicas(), v.GetMaxReplicas(), v.GetTargetInFlight(), req)
}

func jobsOf(rs []*pb.GetJobResponse) []*pb.Job {
	out := make([]*pb.Job, len(rs))
	for i, r := range rs {
		out[i] = r.Job
	}
	return out
}

func newServiceStatusCommand() *cobra.Command {
	var f clientFlags
	cmd := &cobra.Command{
		Use:     "status NAME",
		Short:   "Show a service's URLs (every node's serve or HTTP port), its replicas (node, address, ports, health) and crash loops",
		Example: "  gpumesh service status mlp\n  gpumesh service status mlp --json",
		Args:    oneArg("`gpumesh service list` shows the services"),
		RunE: func(cmd *cobra.Command, args []string) error {
			jobs, err := serviceJobs(cmd, &f, args[0])
			if err != nil {
				return err
			}
			if len(jobs) == 0 {
				return fmt.Errorf("no service named %q is running; gpumesh service list shows the services", args[0])
			}
			out := cmd.OutOrStdout()
			if f.json {
				if len(jobs) == 1 {
					return printJSON(out, jobs[0])
				}
				return printJSON(out, &pb.ListJobsResponse{Jobs: jobsOf(jobs)})
			}
			nodes, err := query(cmd, &f, func(ctx context.Context, c pb.ControlClient) (*pb.ListNodesResponse, error) {
				return c.ListNodes(ctx, &pb.ListNodesRequest{})
			})
			if err != nil {
				return err
			}
			for _, r := range jobs {
				fmt.Fprintf(out, "service %s: job %s, %s, %s wanted%s, routed at /svc/%s/\n", args[0], r.Job.Id, r.Job.Status, plural(int(wantedReplicas(r.Job)), "replica"), scaleNote(r.Job), args[0])
				printServiceURLs(out, nodes.Nodes, args[0], f.tls.ca != "")
				if old, live := oldSpecReplicas(r); old > 0 {
					fmt.Fprintf(out, "rolling update to spec generation %d: %d of %d replicas still on the previous spec (SPEC old), replaced one at a time\n", r.Job.SpecGeneration, old, live)
				}
				printServiceReplicas(out, r)
			}
			return nil
		},
	}
	addClientFlags(cmd, &f)
	readOnly(cmd)
	return cmd
}

// printServiceURLs prints where a service can be reached: every live
// node's serve port (`gpumesh agent --serve`), or its HTTP port where it
// has none (an agent without one, or one that predates Node.serve_addr).
func printServiceURLs(out io.Writer, nodes []*pb.Node, name string, tls bool) {
	scheme := "http"
	if tls {
		scheme = "https" // both ports serve HTTPS when the agents use TLS
	}
	tw := newTable(out)
	n := 0
	for _, nd := range nodes {
		if nd.Status != consensus.NodeReady && nd.Status != consensus.NodeDraining {
			continue
		}
		addr, port := nd.ServeAddr, "serve port"
		if addr == "" {
			addr, port = nd.HttpAddr, "HTTP port"
		}
		if addr == "" {
			continue
		}
		if n == 0 {
			fmt.Fprintln(out, "reach it through any node:")
		}
		n++
		fmt.Fprintf(tw, "  %s\t%s://%s/svc/%s/\t(%s)\n", nd.Name, scheme, addr, name, port)
	}
	tw.Flush()
}

// onOldSpec says whether a replica runs a spec older than its service's
// current one (a rolling update has yet to replace it).
func onOldSpec(j *pb.Job, al *pb.Allocation) bool { return al.Generation < j.SpecGeneration }

// oldSpecReplicas counts a service's live replicas on an older spec, and
// all its live replicas.
func oldSpecReplicas(r *pb.GetJobResponse) (old, live int) {
	for _, al := range liveReplicas(r) {
		live++
		if onOldSpec(r.Job, al) {
			old++
		}
	}
	return old, live
}

// printServiceReplicas prints the live replicas of a service job; SPEC is
// "old" for one a rolling update has yet to replace.
func printServiceReplicas(out io.Writer, r *pb.GetJobResponse) {
	if r.Job.Spec.GetType() != jobspec.TypeService {
		return
	}
	fmt.Fprintln(out)
	live := liveReplicas(r)
	if len(live) == 0 {
		fmt.Fprintln(out, "no replica is running")
	}
	tw := newTable(out)
	if len(live) > 0 {
		fmt.Fprintln(tw, "REPLICA\tNODE\tSTATUS\tHEALTH\tSPEC\tADDRESS\tPORTS")
	}
	for _, al := range live {
		route := al.Ports[r.Job.Spec.GetService().GetRoutePort()]
		addr := "-"
		if route != 0 {
			host, _, _ := net.SplitHostPort(al.RankAddr)
			addr = net.JoinHostPort(host, strconv.Itoa(int(route)))
		}
		names := make([]string, 0, len(al.Ports))
		for n, p := range al.Ports {
			names = append(names, fmt.Sprintf("%s=%d", n, p))
		}
		sort.Strings(names)
		spec := "current"
		if onOldSpec(r.Job, al) {
			spec = "old"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", al.Rank, dash(al.NodeName), dash(al.ClientStatus), dash(al.Health), spec, addr, dash(strings.Join(names, ",")))
	}
	tw.Flush()
	printCrashLoops(out, r, time.Now())
}

// printCrashLoops prints a line for every replica slot of a service whose
// replicas failed in a row (the scheduler's crash-loop back-off): how
// often, how the last one ended and when the next one starts.
func printCrashLoops(out io.Writer, r *pb.GetJobResponse, now time.Time) {
	bs := consensus.ServiceBackoffs(r.Job, r.Allocations, now)
	if len(bs) == 0 {
		return
	}
	fmt.Fprintln(out)
	for _, b := range bs {
		last := b.Last
		how := fmt.Sprintf("%s, exit %d", last.ClientStatus, last.ExitCode)
		if last.Message != "" {
			how += ": " + last.Message
		}
		if last.HealthyTime == nil {
			how += "; never healthy"
		}
		word := "failed"
		if b.Failures >= consensus.CrashLoopAt {
			word = "crash-looping"
		}
		logs := fmt.Sprintf("    its output: gpumesh job logs %s --rank %d --generation %d\n", r.Job.Id, b.Slot, last.Generation)
		switch {
		case b.Waiting:
			left := b.NextTry.Sub(now)
			if left < 10*time.Second {
				left = left.Round(100 * time.Millisecond)
			} else {
				left = left.Round(time.Second)
			}
			fmt.Fprintf(out, "replica %d %s: %s in a row (the last %s); next try in %s (%s, back-off %s)\n%s",
				b.Slot, word, plural(int(b.Failures), "failure"), how, left, b.NextTry.UTC().Format("15:04:05 MST"), b.Delay, logs)
		case consensus.AllocTerminal(last.ClientStatus):
			fmt.Fprintf(out, "replica %d %s: %s in a row (the last %s); its next replica is due\n%s", b.Slot, word, plural(int(b.Failures), "failure"), how, logs)
		default:
			fmt.Fprintf(out, "replica %d: %s in a row before the running one; the count ends once it stays healthy for %s\n", b.Slot, plural(int(b.Failures), "failure"), b.ResetAfter)
		}
	}
}
