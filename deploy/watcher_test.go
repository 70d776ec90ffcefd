package deploy

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// recv waits for one event or fails the test.
func recv(t *testing.T, ch <-chan Event, within time.Duration) Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("events channel closed before an event arrived")
		}
		return ev
	case <-time.After(within):
		t.Fatalf("no event within %s", within)
	}
	return Event{}
}

func waitClosed(t *testing.T, ch <-chan Event, within time.Duration) []Event {
	t.Helper()
	var extra []Event
	timeout := time.After(within)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return extra
			}
			extra = append(extra, ev)
		case <-timeout:
			t.Fatalf("events channel not closed within %s", within)
		}
	}
}

func TestWatcherMetadataMockNotices(t *testing.T) {
	// The real mock: the rebalance recommendation appears 1 s after start,
	// the interruption notice 3 s after start.
	endpoint := startAEMM(t, aemmOptions{spotDelay: 3 * time.Second, rebalanceDelay: time.Second})
	m, err := NewIMDS(IMDSConfig{Endpoint: endpoint})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	// Nothing pending right after start: 404 is "no notice".
	if _, err := m.Get(context.Background(), PathSpotInstanceAction); !errors.Is(err, ErrMetadataNotFound) {
		t.Fatalf("instance-action before the delay: err = %v, want ErrMetadataNotFound", err)
	}
	w, err := StartWatcher(context.Background(), m, WatcherConfig{Interval: 200 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	first := recv(t, w.Events(), 30*time.Second)
	if first.Kind != EventRebalance || first.Time.IsZero() || first.Observed.IsZero() {
		t.Fatalf("first event = %+v, want a rebalance recommendation", first)
	}
	second := recv(t, w.Events(), 30*time.Second)
	if second.Kind != EventInterruption || second.Action != "terminate" {
		t.Fatalf("second event = %+v, want a terminate interruption", second)
	}
	// The mock's deadline is the request time + 2 minutes.
	if d := second.Deadline().Sub(second.Observed); d < time.Minute || d > 3*time.Minute {
		t.Fatalf("deadline %s is %s after the notice was observed; want about 2m", second.Deadline(), d)
	}
	// Each kind once: after both, the watcher stops and closes the channel,
	// although the mock keeps answering with a fresh deadline every poll.
	if extra := waitClosed(t, w.Events(), 10*time.Second); len(extra) != 0 {
		t.Fatalf("extra events after both notices: %+v", extra)
	}
}

func TestMetadataMockIPCount(t *testing.T) {
	// -x 1: only the first client address that asks sees notices. Agents that
	// share one machine give their bind address as SourceAddr.
	endpoint := startAEMM(t, aemmOptions{ipCount: 1})
	a, err := NewIMDS(IMDSConfig{Endpoint: endpoint, SourceAddr: "127.0.0.2"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := NewIMDS(IMDSConfig{Endpoint: endpoint, SourceAddr: "127.0.0.3"})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	body, err := a.Get(context.Background(), PathSpotInstanceAction)
	if err != nil {
		t.Fatalf("first client: %v", err)
	}
	if ev, err := ParseInstanceAction(body); err != nil || ev.Action != "terminate" {
		t.Fatalf("first client notice %q: %+v, %v", body, ev, err)
	}
	if _, err := b.Get(context.Background(), PathSpotInstanceAction); !errors.Is(err, ErrMetadataNotFound) {
		t.Fatalf("second client: err = %v, want ErrMetadataNotFound (not eligible)", err)
	}
	// Identity is not limited.
	if id, err := b.Identity(context.Background()); err != nil || !id.OnEC2() {
		t.Fatalf("second client identity: %+v, %v", id, err)
	}
}

func TestWatcherOnceEachAndStop(t *testing.T) {
	md := NewMemMetadata(Identity{InstanceID: "i-1", Lifecycle: LifecycleSpot})
	w, err := StartWatcher(context.Background(), md, WatcherConfig{Interval: 5 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	md.Interrupt("stop", deadline)
	ev := recv(t, w.Events(), 10*time.Second)
	if ev.Kind != EventInterruption || ev.Action != "stop" || !ev.Time.Equal(deadline) || !ev.Deadline().Equal(deadline) {
		t.Fatalf("event = %+v", ev)
	}
	// The notice stays up; the watcher keeps polling the rebalance path
	// only. Let it poll many more times, then check no duplicate came.
	n := md.Gets()
	poll.Until(t, 10*time.Second, func() bool { return md.Gets() > n+20 })
	select {
	case ev := <-w.Events():
		t.Fatalf("duplicate event %+v", ev)
	default:
	}
	w.Stop()
	w.Stop() // idempotent
	if extra := waitClosed(t, w.Events(), time.Second); len(extra) != 0 {
		t.Fatalf("events after Stop: %+v", extra)
	}
}

func TestWatcherContextCancelAndRecovery(t *testing.T) {
	md := NewMemMetadata(UnknownIdentity())
	md.Fail(errors.New("connection refused"))
	ctx, cancel := context.WithCancel(context.Background())
	w, err := StartWatcher(ctx, md, WatcherConfig{Interval: 5 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() bool { return md.Gets() > 10 })
	// Garbage, then a real notice: the garbage is skipped, not delivered.
	md.Fail(nil)
	md.Set(PathRebalance, "not json")
	n := md.Gets()
	poll.Until(t, 10*time.Second, func() bool { return md.Gets() > n+10 })
	md.Rebalance(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	ev := recv(t, w.Events(), 10*time.Second)
	if ev.Kind != EventRebalance || ev.Time.Year() != 2030 || !ev.Deadline().IsZero() {
		t.Fatalf("event = %+v", ev)
	}
	cancel()
	select {
	case <-w.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("watcher did not stop on context cancel")
	}
	waitClosed(t, w.Events(), time.Second)
	w.Stop() // safe after the context stopped it
}

func TestWatcherConfig(t *testing.T) {
	if _, err := StartWatcher(context.Background(), nil, WatcherConfig{}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("nil source: %v", err)
	}
	if _, err := StartWatcher(context.Background(), NewMemMetadata(UnknownIdentity()), WatcherConfig{Interval: -time.Second}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("negative interval: %v", err)
	}
	if DefaultWatcherConfig().Interval != 5*time.Second {
		t.Fatal("default interval must be 5s")
	}
}

func TestParseNotices(t *testing.T) {
	ev, err := ParseInstanceAction(`{"action": "hibernate", "time": "2017-09-18T08:22:00Z"}`)
	if err != nil || ev.Action != "hibernate" || ev.Time != time.Date(2017, 9, 18, 8, 22, 0, 0, time.UTC) {
		t.Fatalf("%+v %v", ev, err)
	}
	for _, bad := range []string{`{}`, `{"action":"terminate","time":"soon"}`, `{"time":"2017-09-18T08:22:00Z"}`, `<html>`} {
		if _, err := ParseInstanceAction(bad); err == nil {
			t.Errorf("ParseInstanceAction(%q) accepted", bad)
		}
	}
	if _, err := ParseRebalance(`{"noticeTime": "x"}`); err == nil {
		t.Error("ParseRebalance accepted a bad time")
	}
	ev, err = ParseRebalance(`{"noticeTime": "2020-10-16T19:18:24Z"}`)
	if err != nil || ev.Kind != EventRebalance || ev.String() != "rebalance-recommendation at 2020-10-16T19:18:24Z" {
		t.Fatalf("%+v %v", ev, err)
	}
}
