package deploy_test

import (
	"context"
	"fmt"
	"time"

	"github.com/gpumesh/gpumesh/deploy"
)

func ExampleDecideScale() {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	policy := deploy.DefaultScalePolicy(3, 10)
	d := deploy.DecideScale(policy, deploy.ScaleState{Now: now, Target: 4, Joined: 4, WaitingJobs: 1, NodesNeeded: 2})
	fmt.Println(d.Target, d.Reason)
	d = deploy.DecideScale(policy, deploy.ScaleState{Now: now, Target: 6, Joined: 6,
		Idle: []deploy.IdleNode{{InstanceID: "i-0a", Since: now.Add(-time.Hour)}}})
	fmt.Println(d.Target, d.Reason)
	// Output:
	// 6 1 gang job waits for 2 nodes: raising target 4 → 6
	// 5 1 node idle for 10m0s and no job waits: lowering target 6 → 5, terminating i-0a
}

func ExampleStartWatcher() {
	md := deploy.NewMemMetadata(deploy.Identity{InstanceID: "i-0a", Lifecycle: deploy.LifecycleSpot})
	md.Interrupt("terminate", time.Date(2026, 1, 1, 12, 2, 0, 0, time.UTC))
	w, err := deploy.StartWatcher(context.Background(), md, deploy.WatcherConfig{Interval: 10 * time.Millisecond})
	if err != nil {
		panic(err)
	}
	defer w.Stop()
	ev := <-w.Events()
	fmt.Println(ev.Kind, ev.Action, ev.Deadline().Format(time.RFC3339))
	// Output: spot-interruption terminate 2026-01-01T12:02:00Z
}
