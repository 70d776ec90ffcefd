package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// logsOptions are `job logs`'s flags.
type logsOptions struct {
	rank           int32
	all            bool
	stderr, follow bool
	gen            uint64
	tail           int
	timestamps     bool
}

func newJobLogsCommand() *cobra.Command {
	var f clientFlags
	var o logsOptions
	cmd := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a rank's stdout (or stderr), or every rank's, from whichever node holds it",
		Long: `Print the output of one rank (--rank, default 0) or of every rank of the
generation (--all, each line prefixed with "[rank N] ") from the nodes that
hold it. -f keeps printing new output until the ranks end; --tail N starts
with the last N lines; --timestamps begins every line with the time the rank
wrote it (to the millisecond, as its node recorded it). Without --stderr it
prints stdout only: a failed rank's error (a Python traceback) is on its stderr.`,
		Example: `  gpumesh job logs hello-1a2b3c4d
  gpumesh job logs hello-1a2b3c4d --all --tail 20 -f
  gpumesh job logs hello-1a2b3c4d --timestamps
  gpumesh job logs hello-1a2b3c4d --rank 1 --stderr -f
  gpumesh job logs hello-1a2b3c4d --generation 1`,
		Args: oneArg(hintJobIDs),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.tail < 0 {
				return fmt.Errorf("--tail %d: give a number of lines >= 0 (0: all)", o.tail)
			}
			if o.all && cmd.Flags().Changed("rank") {
				return errors.New("--all prints every rank: leave out --rank")
			}
			c, done, err := f.dial()
			if err != nil {
				return err
			}
			defer done()
			ctx := cmd.Context()
			var cancel context.CancelFunc
			if !o.follow {
				ctx, cancel = f.ctx(ctx)
			} else {
				ctx, cancel = context.WithCancel(ctx)
			}
			defer cancel()
			ranks := []int32{o.rank}
			if o.all {
				if ranks, err = jobRanks(ctx, c, args[0], o.gen); err != nil {
					return f.explain(err)
				}
			}
			if err := printLogs(ctx, c, args[0], ranks, o, cmd.OutOrStdout()); err != nil {
				return f.explain(err)
			}
			return nil
		},
	}
	addClientFlags(cmd, &f)
	readOnly(cmd)
	fl := cmd.Flags()
	fl.Int32Var(&o.rank, "rank", 0, "show the logs of rank `N`")
	fl.BoolVar(&o.all, "all", false, "every rank's logs, each line prefixed with its rank")
	fl.BoolVar(&o.stderr, "stderr", false, "stderr instead of stdout")
	fl.BoolVarP(&o.follow, "follow", "f", false, "keep printing new output until the ranks end")
	fl.IntVar(&o.tail, "tail", 0, "start with the last `N` lines of each rank (0: all)")
	fl.BoolVar(&o.timestamps, "timestamps", false, "begin every line with the time it was written (UTC; \"-\" where none was recorded: built-in jobs' lines carry their own)")
	fl.Uint64Var(&o.gen, "generation", 0, "generation `N` to show (0: the current one)")
	return cmd
}

// jobRanks lists the ranks of a job's generation (0: the current one).
func jobRanks(ctx context.Context, c pb.ControlClient, id string, gen uint64) ([]int32, error) {
	resp, err := c.GetJob(ctx, &pb.GetJobRequest{Id: id})
	if err != nil {
		return nil, err
	}
	if gen == 0 {
		gen = resp.Job.Generation
	}
	seen := map[int32]bool{}
	var ranks []int32
	for _, al := range resp.Allocations {
		if al.Generation == gen && !seen[al.Rank] {
			seen[al.Rank] = true
			ranks = append(ranks, al.Rank)
		}
	}
	if len(ranks) == 0 {
		return nil, fmt.Errorf("job %s has no ranks in generation %d (it never ran, or it ended long enough ago that garbage collection removed it; `gpumesh job status %s` lists the generations kept)", id, gen, id)
	}
	sort.Slice(ranks, func(i, k int) bool { return ranks[i] < ranks[k] })
	return ranks, nil
}

// printLogs prints the ranks' logs: one rank raw; several with a "[rank N]"
// prefix on every line, one rank after the other, or interleaved line by
// line as they come with --follow.
func printLogs(ctx context.Context, c pb.ControlClient, id string, ranks []int32, o logsOptions, out io.Writer) error {
	var mu sync.Mutex
	prefix := func(r int32) string {
		if len(ranks) > 1 {
			return fmt.Sprintf("[rank %d] ", r)
		}
		return ""
	}
	if !o.follow || len(ranks) == 1 {
		for _, r := range ranks {
			if err := rankLogs(ctx, c, id, r, o, &mu, out, prefix(r)); err != nil {
				return err
			}
		}
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make([]error, len(ranks))
	var wg sync.WaitGroup
	for i, r := range ranks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = rankLogs(ctx, c, id, r, o, &mu, out, prefix(r)); errs[i] != nil {
				cancel() // the command fails: stop following the others
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	return ctx.Err()
}

// rankLogs copies one rank's stream to out (lines written under mu); with a
// tail, it first reads what there is, writes its last lines and follows
// from there.
func rankLogs(ctx context.Context, c pb.ControlClient, id string, rank int32, o logsOptions, mu *sync.Mutex, out io.Writer, prefix string) error {
	req := &pb.LogsRequest{JobId: id, Rank: rank, Stderr: o.stderr, Follow: o.follow, Generation: o.gen, Timestamps: o.timestamps}
	if o.tail > 0 {
		t := &tailBuffer{lines: o.tail}
		lw := &lineWriter{mu: &sync.Mutex{}, w: t, prefix: prefix, stamped: o.timestamps}
		now := proto.Clone(req).(*pb.LogsRequest)
		now.Follow = false
		end, err := copyLogs(ctx, c, now, lw)
		if err == nil {
			err = lw.flush()
		}
		if err != nil {
			return err
		}
		mu.Lock()
		_, err = out.Write(t.bytes())
		mu.Unlock()
		if err != nil || !o.follow {
			return err
		}
		req.Offset = end
	}
	lw := &lineWriter{mu: mu, w: out, prefix: prefix, stamped: o.timestamps}
	_, err := copyLogs(ctx, c, req, lw)
	if ferr := lw.flush(); err == nil {
		err = ferr
	}
	return err
}

// copyLogs copies one Logs stream to w and returns the stream offset after
// the last byte.
func copyLogs(ctx context.Context, c pb.ControlClient, req *pb.LogsRequest, w *lineWriter) (int64, error) {
	stream, err := c.Logs(ctx, req)
	if err != nil {
		return 0, err
	}
	end := req.Offset
	for {
		ch, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return end, nil
		}
		if err != nil {
			return end, err
		}
		if err := w.writeChunk(ch); err != nil {
			return end, err
		}
		end = max(end+int64(len(ch.Data)), ch.Offset+int64(len(ch.Data)))
	}
}

// lineWriter writes a rank's output: as it comes when there is neither a
// prefix nor stamps; else whole lines, each after prefix (and the time it
// was written, when stamped), under a lock shared by the writers of one
// output.
type lineWriter struct {
	mu      *sync.Mutex
	w       io.Writer
	prefix  string
	stamped bool

	buf    []byte
	bufOff int64          // stream offset of buf[0]
	stamps []*pb.LogStamp // write times, from the last one at or before bufOff on
}

func (l *lineWriter) writeChunk(ch *pb.LogChunk) error {
	if len(l.buf) == 0 {
		l.bufOff = ch.Offset
	}
	for _, s := range ch.Stamps {
		if n := len(l.stamps); n == 0 || s.Offset > l.stamps[n-1].Offset {
			l.stamps = append(l.stamps, s)
		}
	}
	_, err := l.Write(ch.Data)
	return err
}

func (l *lineWriter) Write(p []byte) (int, error) {
	if l.prefix == "" && !l.stamped {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.w.Write(p)
	}
	l.buf = append(l.buf, p...)
	end := bytes.LastIndexByte(l.buf, '\n')
	if end < 0 {
		return len(p), nil
	}
	if err := l.emit(l.buf[:end+1]); err != nil {
		return 0, err
	}
	l.buf = append(l.buf[:0], l.buf[end+1:]...)
	return len(p), nil
}

// flush writes a last line that has no newline yet, ending it.
func (l *lineWriter) flush() error {
	if len(l.buf) == 0 {
		return nil
	}
	err := l.emit(append(l.buf, '\n'))
	l.buf = l.buf[:0]
	return err
}

// emit writes whole lines, the first of which starts at l.bufOff.
func (l *lineWriter) emit(lines []byte) error {
	var b bytes.Buffer
	off := l.bufOff
	for len(lines) > 0 {
		i := bytes.IndexByte(lines, '\n')
		b.WriteString(l.prefix)
		if l.stamped {
			b.WriteString(l.timeAt(off))
			b.WriteByte(' ')
		}
		b.Write(lines[:i+1])
		lines = lines[i+1:]
		off += int64(i + 1)
	}
	l.bufOff = off
	l.mu.Lock()
	defer l.mu.Unlock()
	_, err := l.w.Write(b.Bytes())
	return err
}

// timeAt is when the byte at off was written (RFC 3339 in UTC, to the
// millisecond), or "-" where no time was recorded; stamps before it that
// no later byte needs are dropped.
func (l *lineWriter) timeAt(off int64) string {
	i := -1
	for k, s := range l.stamps {
		if s.Offset > off {
			break
		}
		i = k
	}
	if i < 0 {
		return "-"
	}
	l.stamps = l.stamps[i:]
	return time.Unix(0, l.stamps[0].UnixNano).UTC().Format("2006-01-02T15:04:05.000Z07:00")
}

// tailBuffer keeps the last lines of what is written to it (a last line
// without a newline counts as one).
type tailBuffer struct {
	lines int
	buf   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if len(t.buf) > 1<<20 {
		t.buf = append([]byte(nil), t.bytes()...)
	}
	return len(p), nil
}

func (t *tailBuffer) bytes() []byte {
	b := t.buf
	end := len(b)
	if end > 0 && b[end-1] == '\n' {
		end-- // the final newline ends the last line
	}
	n := 0
	for i := end - 1; i >= 0; i-- {
		if b[i] == '\n' {
			n++
			if n == t.lines {
				return b[i+1:]
			}
		}
	}
	return b
}
