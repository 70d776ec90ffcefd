//go:build linux

package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// storeCheckpointer serves every rank from one FileStore (the node's does
// it per job, with a prefetch).
type storeCheckpointer struct {
	c     *checkpoint.Checkpoints
	spool string
	own   bool // Open without a part gives the rank its own (a sharded checkpoint)
}

func (s *storeCheckpointer) CreatePart(_ context.Context, r RankID, step int64) (CheckpointPart, error) {
	return s.c.CreatePart(step, r.Rank, s.spool)
}

func (s *storeCheckpointer) Commit(ctx context.Context, r RankID, m checkpoint.Manifest) error {
	m.Job, m.Generation = r.Job, r.Generation
	return s.c.Commit(ctx, m)
}

func (s *storeCheckpointer) Latest(ctx context.Context, _ RankID) (checkpoint.Manifest, error) {
	return s.c.Latest(ctx)
}

func (s *storeCheckpointer) List(ctx context.Context, _ RankID) ([]checkpoint.Manifest, error) {
	return s.c.List(ctx)
}

func (s *storeCheckpointer) Open(ctx context.Context, r RankID, step int64, part, _ int) (OpenedPart, error) {
	var m checkpoint.Manifest
	var err error
	if step < 0 {
		m, err = s.c.Latest(ctx)
	} else {
		m, err = s.c.Manifest(ctx, step)
	}
	if err != nil {
		return OpenedPart{}, err
	}
	if part < 0 {
		part = 0
		if s.own && len(m.Parts) > 1 {
			part = r.Rank
		}
	}
	f, err := s.c.OpenPart(ctx, m, part, s.spool)
	return OpenedPart{Manifest: m, Part: part, File: f}, err
}

// startCkptServer serves checkpoints of job "j" generation 1 from a
// FileStore in dir.
func startCkptServer(t *testing.T, dir string) *Server {
	t.Helper()
	st, err := checkpoint.NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err := checkpoint.New(st, checkpoint.Config{})
	if err != nil {
		t.Fatal(err)
	}
	cc := collective.DefaultConfig()
	cc.Timeout = 5 * time.Second
	s, err := Listen(Config{
		SocketPath:   filepath.Join(t.TempDir(), "local.sock"),
		Transport:    collective.NewLocalTransport(),
		Collective:   cc,
		Authorizer:   fakeAuth{ranks: 2},
		Checkpointer: &storeCheckpointer{c: c, spool: t.TempDir()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func (cl *client) ckptHello(rank int, secret string) Reply {
	cl.send(EncodeCkptHello(&CkptHello{Version: Version, Rank: rank, Generation: 1, Job: "j", Secret: secret}))
	return cl.recv()
}

// ckptReply is a decoded CKPT_REPLY with its descriptors.
type ckptReply struct {
	status uint8
	body   []byte
	file   *os.File
}

// request sends one checkpoint request, its body in a memfd when it does
// not fit a packet, and reads the reply.
func (cl *client) request(kind uint8, id uint64, body any) ckptReply {
	cl.t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		cl.t.Fatal(err)
	}
	if len(b) > maxInlineBody {
		fd, err := memfdWith(b)
		if err != nil {
			cl.t.Fatal(err)
		}
		defer unix.Close(fd)
		cl.send(EncodeCkptPacket(MsgCkptRequest, kind, FlagBodyInFD, id, b), fd)
	} else {
		cl.send(EncodeCkptPacket(MsgCkptRequest, kind, 0, id, b))
	}
	buf, oob := make([]byte, MaxMessage), make([]byte, 256)
	_ = cl.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	pkt, fds, err := recvPacket(cl.c, buf, oob)
	if err != nil {
		cl.t.Fatalf("reading a checkpoint reply: %v", err)
	}
	status, flags, rid, n, inline, err := DecodeCkptReply(pkt)
	if err != nil || rid != id {
		cl.t.Fatalf("reply to %d: id %d, %v", id, rid, err)
	}
	r := ckptReply{status: status, body: inline}
	if flags&FlagBodyInFD != 0 {
		if len(fds) == 0 {
			cl.t.Fatal("a body in a descriptor without one")
		}
		if r.body, err = readFD(fds[0], int(n)); err != nil {
			cl.t.Fatal(err)
		}
		fds = fds[1:]
	}
	if flags&FlagFile != 0 {
		if len(fds) != 1 {
			cl.t.Fatalf("a reply with a file carries %d descriptors", len(fds))
		}
		r.file = os.NewFile(uintptr(fds[0]), "part")
		cl.t.Cleanup(func() { r.file.Close() })
	} else {
		closeFDs(fds)
	}
	return r
}

func ok(t *testing.T, r ckptReply) CkptBody {
	t.Helper()
	if r.status != StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	var b CkptBody
	if err := json.Unmarshal(r.body, &b); err != nil {
		t.Fatalf("reply body %q: %v", r.body, err)
	}
	return b
}

func i64(v int64) *int64 { return &v }

// A rank writes its part into the file its agent hands it, has it stored,
// commits, and is handed the part back as a file; a manifest too large
// for a packet travels in a memfd both ways.
func TestCheckpointConnectionSavesAndOpens(t *testing.T) {
	s := startCkptServer(t, t.TempDir())
	cl := dial(t, s)
	if r := cl.ckptHello(1, "ok-1"); r.Type != MsgWelcome {
		t.Fatalf("hello: %+v", r)
	}
	if b := ok(t, cl.request(CkptLatest, 1, CkptBody{})); b.Found == nil || *b.Found {
		t.Fatalf("latest of an empty store: %+v", b)
	}
	begin := cl.request(CkptPutBegin, 2, CkptBody{Step: i64(9)})
	ok(t, begin)
	if begin.file == nil {
		t.Fatal("put_begin handed over no file")
	}
	want := bytes.Repeat([]byte("state "), 100_000)
	if _, err := begin.file.Write(want); err != nil {
		t.Fatal(err)
	}
	end := ok(t, cl.request(CkptPutEnd, 3, CkptBody{ID: 2}))
	if len(end.Parts) != 1 || end.Parts[0].Rank != 1 || end.Parts[0].Size != int64(len(want)) {
		t.Fatalf("put_end: %+v", end)
	}
	if r := cl.request(CkptPutEnd, 4, CkptBody{ID: 2}); r.status != StatusBadRequest {
		t.Fatalf("a second put_end of one part: status %d", r.status)
	}
	meta := map[string]string{"big": strings.Repeat("m", 60<<10)} // the body no longer fits a packet
	ok(t, cl.request(CkptCommit, 5, CkptBody{Step: i64(9), WorldSize: 2, Parts: end.Parts, Meta: meta}))

	latest := ok(t, cl.request(CkptLatest, 6, CkptBody{}))
	if latest.Found == nil || !*latest.Found || latest.Manifest.Step != 9 || latest.Manifest.Job != "j" || latest.Manifest.Meta["big"] != meta["big"] {
		t.Fatalf("latest: found %v, step %d, job %q", latest.Found, latest.Manifest.Step, latest.Manifest.Job)
	}
	part := 1
	open := cl.request(CkptOpen, 7, CkptBody{Step: i64(-1), Part: &part, WorldSize: 2})
	if b := ok(t, open); b.Part == nil || *b.Part != 1 || open.file == nil {
		t.Fatalf("open: %+v", b)
	}
	got, err := io.ReadAll(open.file)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("opened part: %d bytes (%v), want the %d written", len(got), err, len(want))
	}
	if l := ok(t, cl.request(CkptList, 8, CkptBody{})); len(l.Manifests) != 1 {
		t.Fatalf("list: %d manifests", len(l.Manifests))
	}
	if r := cl.request(CkptOpen, 9, CkptBody{Step: i64(8)}); r.status != StatusBadRequest || r.file != nil {
		t.Fatalf("open of a step without a checkpoint: status %d, %s", r.status, r.body)
	}
}

// A part whose rank goes away before it ends is dropped: nothing of it
// stays in the store.
func TestCheckpointPartOfAClosedConnectionIsDropped(t *testing.T) {
	dir := t.TempDir()
	s := startCkptServer(t, dir)
	cl := dial(t, s)
	if r := cl.ckptHello(0, "ok-0"); r.Type != MsgWelcome {
		t.Fatalf("hello: %+v", r)
	}
	begin := cl.request(CkptPutBegin, 1, CkptBody{Step: i64(3)})
	ok(t, begin)
	if _, err := begin.file.Write([]byte("half a state")); err != nil {
		t.Fatal(err)
	}
	files := func() []string {
		var out []string
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				out = append(out, p)
			}
			return nil
		})
		return out
	}
	if len(files()) != 1 {
		t.Fatalf("store holds %v while the part is written, want its temporary file", files())
	}
	cl.close()
	poll.Until(t, 10*time.Second, func() error {
		if f := files(); len(f) != 0 {
			return errors.New("left in the store: " + strings.Join(f, ", "))
		}
		return nil
	})
}

// A checkpoint hello with a wrong secret is refused like a group's, and so
// is one on an agent that serves no checkpoints.
func TestCheckpointHelloIsAuthorized(t *testing.T) {
	s := startCkptServer(t, t.TempDir())
	cl := dial(t, s)
	if r := cl.ckptHello(1, "ok-0"); r.Type != MsgError || r.Status != StatusDenied {
		t.Fatalf("wrong secret: %+v", r)
	}
	if !cl.closed() {
		t.Fatal("the agent kept a refused connection open")
	}
	plain := startServer(t, 2)
	cl = dial(t, plain)
	if r := cl.ckptHello(1, "ok-1"); r.Type != MsgError || !strings.Contains(r.Message, "no checkpoints") {
		t.Fatalf("agent without a Checkpointer: %+v", r)
	}
}

// The checkpoint decoders take any packet: they never panic, and what they
// accept encodes back to the same bytes.
func FuzzDecodeCkpt(f *testing.F) {
	f.Add(EncodeCkptHello(&CkptHello{Version: Version, Rank: 2, Generation: 5, Job: "j", Secret: "s"}))
	f.Add(EncodeCkptPacket(MsgCkptRequest, CkptOpen, 0, 7, []byte(`{"step":-1}`)))
	f.Add(EncodeCkptPacket(MsgCkptRequest, CkptCommit, FlagBodyInFD, 7, make([]byte, 100)))
	f.Add([]byte{MsgCkptRequest})
	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := DecodeCkptHello(b); err == nil {
			got, want := EncodeCkptHello(h), append([]byte(nil), b...)
			for _, i := range []int{6, 7, 12, 13, 14, 15} { // padding
				got[i], want[i] = 0, 0
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("hello %x re-encodes to %x", b, got)
			}
		}
		if r, err := DecodeCkptRequest(b); err == nil {
			body := r.Body
			if r.Flags&FlagBodyInFD != 0 {
				body = make([]byte, r.Len)
			}
			got, want := EncodeCkptPacket(MsgCkptRequest, r.Kind, r.Flags, r.ID, body), append([]byte(nil), b...)
			got[3], want[3] = 0, 0
			if !bytes.Equal(got, want) {
				t.Fatalf("request %x re-encodes to %x", b, got)
			}
		}
	})
}
