package node

import (
	"io"
	"os"

	"google.golang.org/grpc"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/driver"
)

// logStream is one rank's stdout or stderr on this node: an exec task's
// rotated logs (*driver.LogReader) or a built-in rank's log file.
type logStream interface {
	io.ReadCloser
	// Offset is the stream offset of the next byte Read returns.
	Offset() int64
	// NewStamps returns the write times recorded since its last call, in
	// stream order; none where the stream does not record them.
	NewStamps() ([]driver.LogStamp, error)
}

var _ logStream = (*driver.LogReader)(nil)

// fileLogs is a built-in rank's log: one file, read to its end, without
// write times (its lines begin with theirs). A nil file reads empty.
type fileLogs struct {
	f   *os.File
	off int64
}

var _ logStream = (*fileLogs)(nil)

func (l *fileLogs) Read(p []byte) (int, error) {
	if l.f == nil {
		return 0, io.EOF
	}
	n, err := l.f.Read(p)
	l.off += int64(n)
	return n, err
}

func (l *fileLogs) Close() error {
	if l.f == nil {
		return nil
	}
	return l.f.Close()
}

func (l *fileLogs) Offset() int64                         { return l.off }
func (l *fileLogs) NewStamps() ([]driver.LogStamp, error) { return nil, nil }

// sendLogs streams r in chunks, each with its stream offset; with stamps,
// also the write times of its bytes: the last stamp at or before its first
// byte, then every stamp inside it.
func sendLogs(r logStream, stamps bool, stream grpc.ServerStreamingServer[pb.LogChunk]) error {
	buf := make([]byte, 32<<10)
	var known []driver.LogStamp // loaded, from the last one at or before the read position on
	for {
		n, err := r.Read(buf)
		if n > 0 {
			// After the read: a read may skip to the oldest file kept.
			off := r.Offset() - int64(n)
			ch := &pb.LogChunk{Data: append([]byte(nil), buf[:n]...), Offset: off}
			if stamps {
				// Every write's stamp is recorded before its bytes, so the
				// bytes just read have theirs.
				more, serr := r.NewStamps()
				if serr != nil {
					return serr
				}
				known = append(known, more...)
				ch.Stamps, known = chunkStamps(known, off, off+int64(n))
			}
			if serr := stream.Send(ch); serr != nil {
				return serr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// chunkStamps picks from stamps (in offset order) those that time the bytes
// [from, to): the last at or before from and those inside; it returns them
// and what to keep for the next chunk (from the last one before to on).
func chunkStamps(stamps []driver.LogStamp, from, to int64) ([]*pb.LogStamp, []driver.LogStamp) {
	first := 0
	for i, s := range stamps {
		if s.Offset <= from {
			first = i
		}
	}
	var out []*pb.LogStamp
	last := first
	for i := first; i < len(stamps) && stamps[i].Offset < to; i++ {
		out = append(out, &pb.LogStamp{Offset: stamps[i].Offset, UnixNano: stamps[i].Time.UnixNano()})
		last = i
	}
	if len(stamps) == 0 {
		return nil, stamps
	}
	return out, stamps[last:]
}
