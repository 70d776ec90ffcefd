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
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// logsOptions are `job logs`'s flags.
type logsOptions struct {
	rank                   int32
	all                    bool
	stdout, stderr, follow bool
	gen                    uint64
	tail                   int
	timestamps             bool
}

// both says whether the rank's stdout and stderr are printed together
// (neither --stdout nor --stderr).
func (o logsOptions) both() bool { return !o.stdout && !o.stderr }

func newJobLogsCommand() *cobra.Command {
	var f clientFlags
	var o logsOptions
	cmd := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a rank's output, or every rank's, from whichever node holds it",
		Long: `Print the output of one rank (--rank, default 0) or of every rank of the
generation (--all, each line prefixed with "[rank N] ") from the nodes that
hold it. -f keeps printing new output until the ranks end; --tail N starts
with the last N lines; --timestamps begins every line with the time the rank
wrote it (to the millisecond, as its node recorded it). A service's
replicas are replaced one at a time, each in a generation of its own:
without --generation, --rank N is replica N's newest and --all every replica.

By default both of a rank's streams are printed, as docker logs does: what
the rank wrote to stdout goes to stdout, what it wrote to stderr (a failed
rank's error, a Python traceback) goes to stderr, in the order the rank wrote
them (--tail counts the lines of both; -f then prints new lines as they come).
--stdout or --stderr prints that stream alone, on stdout.`,
		Example: `  gpumesh job logs hello-1a2b3c4d
  gpumesh job logs hello-1a2b3c4d --all --tail 20 -f
  gpumesh job logs hello-1a2b3c4d --timestamps
  gpumesh job logs hello-1a2b3c4d --rank 1 --stderr -f
  gpumesh job logs hello-1a2b3c4d --stdout > out.txt
  gpumesh job logs hello-1a2b3c4d --generation 1`,
		Args: oneArg(hintJobIDs),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.tail < 0 {
				return fmt.Errorf("--tail %d: give a number of lines >= 0 (0: all)", o.tail)
			}
			if o.stdout && o.stderr {
				return errors.New("--stdout and --stderr each print one stream alone: leave both out to print both")
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
			if err := printLogs(ctx, c, args[0], ranks, o, cmd.OutOrStdout(), cmd.ErrOrStderr()); err != nil {
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
	fl.BoolVar(&o.stdout, "stdout", false, "the rank's stdout alone")
	fl.BoolVar(&o.stderr, "stderr", false, "the rank's stderr alone, printed on stdout")
	fl.BoolVarP(&o.follow, "follow", "f", false, "keep printing new output until the ranks end")
	fl.IntVar(&o.tail, "tail", 0, "start with the last `N` lines of each rank (0: all)")
	fl.BoolVar(&o.timestamps, "timestamps", false, "begin every line with the time it was written (UTC; \"-\" where none was recorded: built-in jobs' lines carry their own)")
	fl.Uint64Var(&o.gen, "generation", 0, "generation `N` to show (0: the current one)")
	return cmd
}

// jobRanks lists the ranks of a job's generation (0: the current one; a
// service's every replica).
func jobRanks(ctx context.Context, c pb.ControlClient, id string, gen uint64) ([]int32, error) {
	resp, err := c.GetJob(ctx, &pb.GetJobRequest{Id: id})
	if err != nil {
		return nil, err
	}
	// A service's replicas each run in a generation of their own (they
	// are replaced one at a time): without --generation, every replica.
	service := gen == 0 && resp.Job.Spec.GetType() == jobspec.TypeService
	if gen == 0 {
		gen = resp.Job.Generation
	}
	seen := map[int32]bool{}
	var ranks []int32
	for _, al := range resp.Allocations {
		if (al.Generation == gen || service && al.Rank < resp.Job.WorldSize) && !seen[al.Rank] {
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
// line as they come with --follow. A rank's stdout goes to out and its
// stderr to errOut, unless one stream alone was asked for: that one goes to
// out.
func printLogs(ctx context.Context, c pb.ControlClient, id string, ranks []int32, o logsOptions, out, errOut io.Writer) error {
	var mu sync.Mutex
	prefix := func(r int32) string {
		if len(ranks) > 1 {
			return fmt.Sprintf("[rank %d] ", r)
		}
		return ""
	}
	if !o.follow || len(ranks) == 1 {
		for _, r := range ranks {
			if err := rankLogs(ctx, c, id, r, o, &mu, out, errOut, prefix(r)); err != nil {
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
			if errs[i] = rankLogs(ctx, c, id, r, o, &mu, out, errOut, prefix(r)); errs[i] != nil {
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

// rankLogs prints one rank's output: the one stream asked for, or both.
func rankLogs(ctx context.Context, c pb.ControlClient, id string, rank int32, o logsOptions, mu *sync.Mutex, out, errOut io.Writer, prefix string) error {
	if o.both() {
		return rankBothLogs(ctx, c, id, rank, o, mu, out, errOut, prefix)
	}
	req := &pb.LogsRequest{JobId: id, Rank: rank, Stderr: o.stderr, Follow: o.follow, Generation: o.gen, Timestamps: o.timestamps}
	return streamLogs(ctx, c, req, o, mu, out, prefix)
}

// streamLogs copies one stream to out (lines written under mu); with a
// tail, it first reads what there is, writes its last lines and follows
// from there.
func streamLogs(ctx context.Context, c pb.ControlClient, req *pb.LogsRequest, o logsOptions, mu *sync.Mutex, out io.Writer, prefix string) error {
	if o.tail > 0 {
		t := &tailBuffer{lines: o.tail}
		lw := &lineWriter{mu: &sync.Mutex{}, w: t, prefix: prefix, stamped: o.timestamps}
		now := proto.Clone(req).(*pb.LogsRequest)
		now.Follow = false
		end, err := copyLogs(ctx, c, now, lw.writeChunk)
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
	_, err := copyLogs(ctx, c, req, lw.writeChunk)
	if ferr := lw.flush(); err == nil {
		err = ferr
	}
	return err
}

// rankBothLogs prints a rank's stdout on out and its stderr on errOut: what
// there is, merged in the order the rank wrote it (--tail counting the
// lines of both), then, with --follow, both streams as they come.
func rankBothLogs(ctx context.Context, c pb.ControlClient, id string, rank int32, o logsOptions, mu *sync.Mutex, out, errOut io.Writer, prefix string) error {
	ws := [2]io.Writer{out, errOut}
	var reqs [2]*pb.LogsRequest
	for i := range reqs {
		// The write times order the merge; they are printed only with --timestamps.
		reqs[i] = &pb.LogsRequest{JobId: id, Rank: rank, Stderr: i == 1, Generation: o.gen, Timestamps: true}
	}
	m := &mergedOut{mu: mu, ws: ws, prefix: prefix, stamped: o.timestamps}
	ends, err := mergeStreams(ctx, c, reqs, o.tail, m.line)
	if ferr := m.flush(); err == nil {
		err = ferr
	}
	if err != nil || !o.follow {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var first error
	var once sync.Once
	var wg sync.WaitGroup
	for i, req := range reqs {
		req.Follow, req.Offset, req.Timestamps = true, ends[i], o.timestamps
		wg.Add(1)
		go func() {
			defer wg.Done()
			lw := &lineWriter{mu: mu, w: ws[i], prefix: prefix, stamped: o.timestamps}
			_, err := copyLogs(ctx, c, req, lw.writeChunk)
			if ferr := lw.flush(); err == nil {
				err = ferr
			}
			if err != nil {
				once.Do(func() { first = err })
				cancel() // the command fails: stop following the other stream
			}
		}()
	}
	wg.Wait()
	return first
}

// timedLine is one line of a stream, its newline included (a last line may
// have none), and when its first byte was written (Unix ns; 0: not
// recorded).
type timedLine struct {
	data []byte
	at   int64
}

// mergeStreams reads what there is of a rank's two streams (reqs[0] its
// stdout, reqs[1] its stderr) at once and hands emit their lines in the
// order they were written: the earlier first; stdout's first on a tie or
// where a line's time was not recorded. With tail > 0 only the last tail
// lines of the merge are emitted. It returns each stream's offset after its
// last byte.
func mergeStreams(ctx context.Context, c pb.ControlClient, reqs [2]*pb.LogsRequest, tail int, emit func(stream int, l timedLine) error) ([2]int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var ends [2]int64
	var first error // the first stream to fail: the other then fails cancelled
	var once sync.Once
	var lines [2]chan timedLine
	var wg sync.WaitGroup
	for i, req := range reqs {
		ch := make(chan timedLine, 256)
		lines[i] = ch
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(ch)
			send := func(l timedLine) error {
				l.data = bytes.Clone(l.data) // the splitter reuses its buffer
				select {
				case ch <- l:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			var s lineSplitter
			end, err := copyLogs(ctx, c, req, func(chunk *pb.LogChunk) error {
				s.add(chunk)
				return s.lines(false, send)
			})
			if err == nil {
				err = s.lines(true, send)
			}
			ends[i] = end
			if err != nil {
				once.Do(func() { first = err })
				cancel() // stop reading the other stream
			}
		}()
	}
	type tagged struct {
		stream int
		line   timedLine
	}
	// With a tail: the lines merged, oldest first, cut back to the last
	// tail whenever twice that many gathered (amortised O(1) a line).
	var last []tagged
	out := func(i int, l timedLine) error {
		if tail <= 0 {
			return emit(i, l)
		}
		if len(last) == 2*tail {
			last = append(last[:0], last[tail:]...)
		}
		last = append(last, tagged{i, l})
		return nil
	}
	var heads [2]*timedLine
	next := func(i int) {
		heads[i] = nil
		if l, ok := <-lines[i]; ok {
			heads[i] = &l
		}
	}
	next(0)
	next(1)
	var err error
	for err == nil && (heads[0] != nil || heads[1] != nil) {
		i := 0
		if h0, h1 := heads[0], heads[1]; h0 == nil || h1 != nil && h0.at != 0 && h1.at != 0 && h1.at < h0.at {
			i = 1
		}
		if err = out(i, *heads[i]); err == nil {
			next(i)
		}
	}
	cancel()
	for range lines[0] { // let a reader blocked on a full channel see the cancel
	}
	for range lines[1] {
	}
	wg.Wait()
	if err == nil {
		err = first
	}
	if err != nil {
		return ends, err
	}
	for _, t := range last[max(0, len(last)-tail):] {
		if err := emit(t.stream, t.line); err != nil {
			return ends, err
		}
	}
	return ends, nil
}

// mergedOut writes merged lines, each to its stream's writer (under mu),
// a run of one stream's lines at a time so that a long log is not written
// line by line.
type mergedOut struct {
	mu      *sync.Mutex
	ws      [2]io.Writer
	prefix  string
	stamped bool

	cur int // the stream buf holds lines of
	buf bytes.Buffer
}

func (m *mergedOut) line(i int, l timedLine) error {
	if i != m.cur || m.buf.Len() >= 32<<10 {
		if err := m.flush(); err != nil {
			return err
		}
		m.cur = i
	}
	formatLine(&m.buf, m.prefix, m.stamped, l)
	return nil
}

func (m *mergedOut) flush() error {
	if m.buf.Len() == 0 {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	_, err := m.ws[m.cur].Write(m.buf.Bytes())
	m.buf.Reset()
	return err
}

// formatLine appends l to b as printed: raw, or after prefix and (stamped)
// its write time, then ended with a newline if it has none.
func formatLine(b *bytes.Buffer, prefix string, stamped bool, l timedLine) {
	if prefix == "" && !stamped {
		b.Write(l.data)
		return
	}
	b.WriteString(prefix)
	if stamped {
		b.WriteString(stampText(l.at))
		b.WriteByte(' ')
	}
	b.Write(l.data)
	if len(l.data) == 0 || l.data[len(l.data)-1] != '\n' {
		b.WriteByte('\n')
	}
}

// stampText is a write time as printed: RFC 3339 in UTC, to the
// millisecond, or "-" where none was recorded.
func stampText(at int64) string {
	if at == 0 {
		return "-"
	}
	return time.Unix(0, at).UTC().Format("2006-01-02T15:04:05.000Z07:00")
}

// copyLogs hands one Logs stream's chunks to fn and returns the stream
// offset after the last byte.
func copyLogs(ctx context.Context, c pb.ControlClient, req *pb.LogsRequest, fn func(*pb.LogChunk) error) (int64, error) {
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
		if err := fn(ch); err != nil {
			return end, err
		}
		end = max(end+int64(len(ch.Data)), ch.Offset+int64(len(ch.Data)))
	}
}

// lineSplitter cuts a stream into lines, each with the time its first byte
// was written (from the chunks' stamps).
type lineSplitter struct {
	buf    []byte
	bufOff int64          // stream offset of buf[0]
	stamps []*pb.LogStamp // write times, from the last one at or before bufOff on
}

// add appends a chunk's bytes and write times.
func (s *lineSplitter) add(ch *pb.LogChunk) {
	if len(s.buf) == 0 {
		s.bufOff = ch.Offset
	}
	for _, st := range ch.Stamps {
		if n := len(s.stamps); n == 0 || st.Offset > s.stamps[n-1].Offset {
			s.stamps = append(s.stamps, st)
		}
	}
	s.buf = append(s.buf, ch.Data...)
}

// lines hands fn the whole lines buffered (with final, also a last one
// without a newline) and drops them. fn's line is valid only during the
// call.
func (s *lineSplitter) lines(final bool, fn func(timedLine) error) error {
	end := bytes.LastIndexByte(s.buf, '\n') + 1
	if final {
		end = len(s.buf)
	}
	rest, off := s.buf[:end], s.bufOff
	for len(rest) > 0 {
		n := bytes.IndexByte(rest, '\n') + 1
		if n == 0 {
			n = len(rest)
		}
		if err := fn(timedLine{data: rest[:n], at: s.timeAt(off)}); err != nil {
			return err
		}
		rest, off = rest[n:], off+int64(n)
	}
	s.bufOff = off
	s.buf = append(s.buf[:0], s.buf[end:]...)
	return nil
}

// timeAt is when the byte at off was written (Unix ns), or 0 where no time
// was recorded; stamps before it that no later byte needs are dropped.
func (s *lineSplitter) timeAt(off int64) int64 {
	i := -1
	for k, st := range s.stamps {
		if st.Offset > off {
			break
		}
		i = k
	}
	if i < 0 {
		return 0
	}
	s.stamps = s.stamps[i:]
	return s.stamps[0].UnixNano
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

	lineSplitter
}

func (l *lineWriter) raw() bool { return l.prefix == "" && !l.stamped }

func (l *lineWriter) writeChunk(ch *pb.LogChunk) error {
	if l.raw() {
		_, err := l.Write(ch.Data)
		return err
	}
	l.add(ch)
	return l.emit(false)
}

func (l *lineWriter) Write(p []byte) (int, error) {
	if l.raw() {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.w.Write(p)
	}
	l.buf = append(l.buf, p...)
	if err := l.emit(false); err != nil {
		return 0, err
	}
	return len(p), nil
}

// flush writes a last line that has no newline yet, ending it.
func (l *lineWriter) flush() error { return l.emit(true) }

// emit writes the whole lines buffered (final: all of it) at once.
func (l *lineWriter) emit(final bool) error {
	var b bytes.Buffer
	l.lines(final, func(tl timedLine) error {
		formatLine(&b, l.prefix, l.stamped, tl)
		return nil
	})
	if b.Len() == 0 {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	_, err := l.w.Write(b.Bytes())
	return err
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
