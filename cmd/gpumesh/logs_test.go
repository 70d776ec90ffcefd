package main

import (
	"bytes"
	"context"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

func TestTailBuffer(t *testing.T) {
	for _, tc := range []struct {
		in    string
		lines int
		want  string
	}{
		{"a\nb\nc\n", 2, "b\nc\n"},
		{"a\nb\nc", 2, "b\nc"},
		{"a\nb\n", 5, "a\nb\n"},
		{"a\n\n\n", 2, "\n\n"},
		{"", 3, ""},
	} {
		tb := tailBuffer{lines: tc.lines}
		for i := range tc.in { // byte by byte: chunk borders do not matter
			tb.Write([]byte{tc.in[i]})
		}
		if got := string(tb.bytes()); got != tc.want {
			t.Errorf("tail %d of %q = %q, want %q", tc.lines, tc.in, got, tc.want)
		}
	}
	// Past the trimming threshold it still keeps exactly the last lines.
	tb := tailBuffer{lines: 2}
	line := bytes.Repeat([]byte("x"), 1023)
	for i := 0; i < 3000; i++ {
		tb.Write(append(line, '\n'))
	}
	tb.Write([]byte("last\n"))
	if got, want := string(tb.bytes()), string(line)+"\nlast\n"; got != want {
		t.Errorf("after 3 MiB: %d bytes, want %d", len(got), len(want))
	}
}

func TestLineWriterPrefixesWholeLines(t *testing.T) {
	var mu sync.Mutex
	var out bytes.Buffer
	a := &lineWriter{mu: &mu, w: &out, prefix: "[rank 0] "}
	b := &lineWriter{mu: &mu, w: &out, prefix: "[rank 1] "}
	a.Write([]byte("hel"))
	b.Write([]byte("one\ntw"))
	a.Write([]byte("lo\nworld\n"))
	b.Write([]byte("o"))
	a.flush()
	b.flush()
	want := "[rank 1] one\n[rank 0] hello\n[rank 0] world\n[rank 1] two\n"
	if out.String() != want {
		t.Fatalf("got %q, want %q", out.String(), want)
	}
	out.Reset()
	raw := &lineWriter{mu: &mu, w: &out}
	raw.Write([]byte("no prefix, no newline"))
	raw.flush()
	if out.String() != "no prefix, no newline" {
		t.Fatalf("one rank is copied as is: %q", out.String())
	}
}

// Stamped lines begin with the time of the write their first byte came in,
// whatever the chunk borders.
func TestLineWriterStamps(t *testing.T) {
	var mu sync.Mutex
	var out bytes.Buffer
	t0 := time.Date(2026, 12, 7, 5, 0, 0, 0, time.UTC)
	at := func(off int64, ms int) *pb.LogStamp {
		return &pb.LogStamp{Offset: off, UnixNano: t0.Add(time.Duration(ms) * time.Millisecond).UnixNano()}
	}
	lw := &lineWriter{mu: &mu, w: &out, prefix: "[rank 1] ", stamped: true}
	// Stream from offset 100: "a\nbb\n" written at +1ms, "c" at +2ms, "c\nd" at +3ms.
	chunks := []*pb.LogChunk{
		{Offset: 100, Data: []byte("a\nb"), Stamps: []*pb.LogStamp{at(100, 1)}},
		{Offset: 103, Data: []byte("b\nc"), Stamps: []*pb.LogStamp{at(100, 1), at(105, 2)}},
		{Offset: 106, Data: []byte("c\nd"), Stamps: []*pb.LogStamp{at(105, 2), at(106, 3)}},
	}
	for _, ch := range chunks {
		if err := lw.writeChunk(ch); err != nil {
			t.Fatal(err)
		}
	}
	lw.flush()
	want := "[rank 1] 2026-12-07T05:00:00.001Z a\n" +
		"[rank 1] 2026-12-07T05:00:00.001Z bb\n" +
		"[rank 1] 2026-12-07T05:00:00.002Z cc\n" +
		"[rank 1] 2026-12-07T05:00:00.003Z d\n"
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
	// No stamps (a built-in rank, an older node): "-".
	out.Reset()
	lw = &lineWriter{mu: &mu, w: &out, stamped: true}
	lw.writeChunk(&pb.LogChunk{Data: []byte("x\n")})
	if out.String() != "- x\n" {
		t.Fatalf("unstamped: %q", out.String())
	}
}

// fakeLogs serves each stream's chunks (stdout: false, stderr: true) from
// the request's offset on; those marked later only to a follow.
type fakeLogs struct {
	pb.ControlClient
	chunks map[bool][]fakeChunk
	fail   map[bool]error
}

type fakeChunk struct {
	*pb.LogChunk
	later bool
}

func (f fakeLogs) Logs(_ context.Context, req *pb.LogsRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[pb.LogChunk], error) {
	if err := f.fail[req.Stderr]; err != nil {
		return nil, err
	}
	s := &chunkStream{}
	for _, ch := range f.chunks[req.Stderr] {
		if ch.Offset < req.Offset || ch.later && !req.Follow {
			continue
		}
		c := proto.Clone(ch.LogChunk).(*pb.LogChunk)
		if !req.Timestamps {
			c.Stamps = nil
		}
		s.chunks = append(s.chunks, c)
	}
	return s, nil
}

type chunkStream struct {
	grpc.ClientStream
	chunks []*pb.LogChunk
}

func (s *chunkStream) Recv() (*pb.LogChunk, error) {
	if len(s.chunks) == 0 {
		return nil, io.EOF
	}
	ch := s.chunks[0]
	s.chunks = s.chunks[1:]
	return ch, nil
}

// seqWriter records each write with the name of the output it went to.
type seqWriter struct {
	name   string
	writes *[]string
}

func (w seqWriter) Write(p []byte) (int, error) {
	*w.writes = append(*w.writes, w.name+": "+string(p))
	return len(p), nil
}

// A failed rank's traceback is on its stderr: `job logs` without a stream
// flag prints both, each on its own output, in the order the rank wrote
// them; --tail counts the lines of both; --stdout/--stderr print one alone.
func TestJobLogsPrintsBothStreamsInWriteOrder(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 5, 0, 0, 0, time.UTC)
	chunk := func(off int64, data string, ms ...int) *pb.LogChunk {
		ch := &pb.LogChunk{Offset: off, Data: []byte(data)}
		for i, m := range ms { // one stamp per line
			ch.Stamps = append(ch.Stamps, &pb.LogStamp{Offset: off + int64(i)*8, UnixNano: t0.Add(time.Duration(m) * time.Millisecond).UnixNano()})
		}
		return ch
	}
	c := fakeLogs{chunks: map[bool][]fakeChunk{
		false: {{chunk(0, "epoch 1\nepoch 2\n", 1, 3), false}},
		true:  {{chunk(0, "warning\n", 2), false}, {chunk(8, "Tracebk\nError!!\n", 4, 4), false}, {chunk(24, "bye\n", 5), true}},
	}}
	for _, tc := range []struct {
		name string
		o    logsOptions
		want []string
	}{
		{"both", logsOptions{}, []string{"out: epoch 1\n", "err: warning\n", "out: epoch 2\n", "err: Tracebk\nError!!\n"}},
		{"tail", logsOptions{tail: 3}, []string{"out: epoch 2\n", "err: Tracebk\nError!!\n"}},
		{"stamped", logsOptions{tail: 1, timestamps: true}, []string{"err: 2026-12-07T05:00:00.004Z Error!!\n"}},
		{"follow", logsOptions{follow: true, tail: 1}, []string{"err: Error!!\n", "err: bye\n"}},
		{"stdout", logsOptions{stdout: true}, []string{"out: epoch 1\nepoch 2\n"}},
		{"stderr", logsOptions{stderr: true}, []string{"out: warning\n", "out: Tracebk\nError!!\n"}},
	} {
		var writes []string
		err := printLogs(context.Background(), c, "j-1", []int32{0}, tc.o, seqWriter{"out", &writes}, seqWriter{"err", &writes})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if !slices.Equal(writes, tc.want) {
			t.Errorf("%s: wrote %q, want %q", tc.name, writes, tc.want)
		}
	}

	// A stream that cannot be read fails the command with its own error,
	// not with the other stream's cancellation.
	c.fail = map[bool]error{true: status.Error(codes.NotFound, "no such rank")}
	var writes []string
	err := printLogs(context.Background(), c, "j-1", []int32{0}, logsOptions{}, seqWriter{"out", &writes}, seqWriter{"err", &writes})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("err = %v, want NotFound", err)
	}
}

// --stdout and --stderr together is refused before any call, with what to
// write instead.
func TestJobLogsStdoutAndStderrRefused(t *testing.T) {
	root := newRootCommand()
	root.SetArgs([]string{"job", "logs", "j-1", "--stdout", "--stderr", "--address", "127.0.0.1:1"})
	var sink strings.Builder
	root.SetOut(&sink)
	root.SetErr(&sink)
	err := root.Execute()
	if err == nil || !strings.Contains(err.Error(), "leave both out to print both") {
		t.Fatalf("err = %v", err)
	}
}
