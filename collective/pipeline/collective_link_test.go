package pipeline

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// grpcPipeline starts one data-plane server per stage on 127.0.0.1 and
// opens every stage's links over the real NetTransport.
func grpcPipeline(t *testing.T, job string, gen uint64, p int, cfg CollectiveConfig) []StageLinks {
	t.Helper()
	links, _ := grpcPipelineServers(t, job, gen, p, cfg, collective.DataPlaneTCP)
	return links
}

// grpcPipelineServers is grpcPipeline with the data plane's mode (TCP
// lanes or frames on the gRPC streams) and the servers.
func grpcPipelineServers(t *testing.T, job string, gen uint64, p int, cfg CollectiveConfig, plane string) ([]StageLinks, []*collective.Server) {
	t.Helper()
	servers := make([]*collective.Server, p)
	addrs := make([]string, p)
	gcfg := collective.DefaultNetConfig()
	gcfg.DataPlane = plane
	for s := range servers {
		srv, err := collective.Listen("127.0.0.1:0", gcfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Close() })
		servers[s], addrs[s] = srv, srv.Addr()
	}
	links := make([]StageLinks, p)
	for s := 0; s < p; s++ {
		c := cfg
		c.JobID, c.Generation, c.Stage, c.Stages, c.Addrs = job, gen, s, p, addrs
		l, err := OpenCollectiveLinks(servers[s].Transport(), c)
		if err != nil {
			t.Fatal(err)
		}
		links[s] = l
	}
	return links, servers
}

// countLink counts received messages.
type countLink struct {
	Link
	n atomic.Int64
}

func (c *countLink) Recv() (*Message, error) {
	m, err := c.Link.Recv()
	if err == nil {
		c.n.Add(1)
	}
	return m, err
}

func TestCollectiveLinksMatchSingleProcess(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := baseSpec()
	ref, err := RunReference(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, links []StageLinks) {
		reps, errs := runPipeline(t, ctx, spec, links, nil)
		for i, err := range errs {
			if err != nil {
				t.Fatalf("%s: stage %d: %v", name, i, err)
			}
		}
		last := reps[len(reps)-1]
		for i, l := range last.Losses {
			if !relClose(l, ref.Losses[i], 1e-5) {
				t.Fatalf("%s: step %d loss %v, single process %v", name, i, l, ref.Losses[i])
			}
		}
	}
	// In-process transport.
	lt := collective.NewLocalTransport()
	addrs := []string{"a", "b", "c", "d"}
	var local []StageLinks
	for s := 0; s < 4; s++ {
		l, err := OpenCollectiveLinks(lt, CollectiveConfig{JobID: "job-1", Generation: 3, Stage: s, Stages: 4, Addrs: addrs, Channels: 2, ChunkBytes: 4096})
		if err != nil {
			t.Fatal(err)
		}
		local = append(local, l)
	}
	check("local", local)
	// Real gRPC on loopback, small chunks so messages span channels: with
	// TCP lanes (the default) and with frames on the gRPC streams.
	check("grpc lanes", grpcPipeline(t, "job-1", 3, 4, CollectiveConfig{Channels: 3, ChunkBytes: 4096}))
	lanes, _ := grpcPipelineServers(t, "job-1", 3, 4, CollectiveConfig{Channels: 3, ChunkBytes: 4096}, collective.DataPlaneGRPC)
	check("grpc streams", lanes)
}

func TestCollectiveLinkLargeMessages(t *testing.T) {
	links := grpcPipeline(t, "big", 1, 2, CollectiveConfig{Channels: 4, ChunkBytes: 1 << 20})
	defer links[0].Close()
	defer links[1].Close()
	const n = 3<<20 + 5 // several chunks and a ragged tail
	data := make([]float32, n)
	for i := range data {
		data[i] = float32(i)
	}
	errc := make(chan error, 1)
	go func() {
		for k := 0; k < 3; k++ {
			if err := links[0].Next.Send(&Message{Tag: Tag{JobID: "big", Generation: 1, Step: k, MicroBatch: 7, Dir: DirActivation}, Rows: 1, Cols: n, Data: data}); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for k := 0; k < 3; k++ {
		m, err := links[1].Prev.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if m.Tag.Step != k || m.Tag.MicroBatch != 7 || m.Tag.Dir != DirActivation || m.Rows != 1 || m.Cols != n || len(m.Data) != n {
			t.Fatalf("message %d: %v %d×%d (%d values)", k, m.Tag, m.Rows, m.Cols, len(m.Data))
		}
		for i := 0; i < n; i += 9973 {
			if m.Data[i] != float32(i) {
				t.Fatalf("message %d value %d = %v", k, i, m.Data[i])
			}
		}
		m.Release()
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func TestCollectiveLinkPeerDeath(t *testing.T) {
	for _, plane := range []string{collective.DataPlaneTCP, collective.DataPlaneGRPC} {
		t.Run(plane, func(t *testing.T) { testCollectiveLinkPeerDeath(t, plane) })
	}
}

func testCollectiveLinkPeerDeath(t *testing.T, plane string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	links, servers := grpcPipelineServers(t, "job-1", 3, 3, CollectiveConfig{}, plane)
	spec := baseSpec()
	spec.Steps = 1 << 20
	counted := &countLink{Link: links[2].Prev}
	links[2].Prev = counted
	runUntilLinkDies(t, ctx, spec, links, 3, func() {
		// Once training runs, stage 2's node dies: its data-plane server goes.
		for counted.n.Load() < 20 {
			if ctx.Err() != nil {
				t.Fatal("training did not start")
			}
			time.Sleep(time.Millisecond)
		}
		servers[2].Close()
	})
}

func TestOpenCollectiveLinksValidates(t *testing.T) {
	lt := collective.NewLocalTransport()
	for _, c := range []CollectiveConfig{
		{Stage: 0, Stages: 2, Addrs: []string{"a", "b"}},
		{JobID: "j", Stage: 2, Stages: 2, Addrs: []string{"a", "b"}},
		{JobID: "j", Stage: 0, Stages: 2, Addrs: []string{"a"}},
		{JobID: "j", Stage: 0, Stages: 2, Addrs: []string{"a", "b"}, ChunkBytes: 100},
	} {
		if _, err := OpenCollectiveLinks(lt, c); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%+v: err = %v, want ErrInvalidSpec", c, err)
		}
	}
}

// BenchmarkLinkStream streams 4 MiB activations from one stage to the next
// through the stage queues, over each kind of link.
func BenchmarkLinkStream(b *testing.B) {
	for _, kind := range []string{"tcp", "grpc"} {
		b.Run(kind, func(b *testing.B) {
			cfg := DefaultBenchConfig()
			cfg.Transport, cfg.Channels = kind, 4
			links, cleanup, err := benchLinks(context.Background(), cfg, "bw", 2)
			if err != nil {
				b.Fatal(err)
			}
			defer cleanup()
			const elems = 1 << 20
			payload := make([]float32, elems)
			snd := newEndpoint("next", links[0].Next, 2, time.Minute, "bw", 0)
			rcv := newEndpoint("prev", links[1].Prev, 2, time.Minute, "bw", 0)
			defer snd.close()
			defer rcv.close()
			b.SetBytes(elems * 4)
			b.ResetTimer()
			errc := make(chan error, 1)
			go func() {
				for i := 0; i < b.N; i++ {
					if err := snd.Post(context.Background(), &Message{Tag: Tag{JobID: "bw", MicroBatch: i, Dir: DirActivation}, Rows: 1, Cols: elems, Data: payload}); err != nil {
						errc <- err
						return
					}
				}
				errc <- nil
			}()
			for i := 0; i < b.N; i++ {
				m, err := rcv.Expect(context.Background(), Tag{JobID: "bw", MicroBatch: i, Dir: DirActivation})
				if err != nil {
					b.Fatal(err)
				}
				m.Release()
			}
			if err := <-errc; err != nil {
				b.Fatal(err)
			}
		})
	}
}
