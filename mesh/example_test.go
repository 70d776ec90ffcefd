package mesh_test

import (
	"context"
	"fmt"
	"time"

	"github.com/gpumesh/gpumesh/mesh"
)

// Two nodes on loopback: b joins a, a sees b's metadata, b drains.
func Example() {
	start := func(name string) *mesh.Mesh {
		cfg := mesh.DefaultLocalConfig() // 127.0.0.1, a free port
		cfg.NodeName, cfg.NodeID = name, "id-"+name
		cfg.Meta = mesh.Meta{
			GPUs:      []mesh.GPU{{Model: "Tesla T4", MemoryBytes: 16 << 30}},
			Lifecycle: mesh.LifecycleSpot,
		}
		m, err := mesh.New(cfg)
		if err != nil {
			panic(err)
		}
		return m
	}
	a, b := start("a"), start("b")
	defer a.Shutdown()
	defer b.Shutdown()
	events, cancel := a.Subscribe()
	defer cancel()

	if _, err := b.Join(context.Background(), []string{a.Addr()}); err != nil {
		panic(err)
	}
	ev := <-events
	fmt.Println(ev.Type, ev.Member.Name, ev.Member.Meta.GPUCount(), "GPU", ev.Member.Meta.Lifecycle)

	if err := b.UpdateMeta(func(m *mesh.Meta) { m.Status = mesh.StatusDraining }); err != nil {
		panic(err)
	}
	for ev = range events {
		if ev.Type == mesh.EventUpdate {
			break
		}
	}
	fmt.Println(ev.Type, ev.Member.Name, ev.Member.Meta.Status)

	b.Leave(time.Second)
	for ev = range events {
		if ev.Member.Name == "b" {
			break
		}
	}
	fmt.Println(ev.Type, ev.Member.Name, ev.Member.State)
	// Output:
	// join b 1 GPU spot
	// update b draining
	// leave b left
}
