package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Metadata paths the watcher polls (relative to /latest/meta-data/).
const (
	PathSpotInstanceAction = "spot/instance-action"
	PathRebalance          = "events/recommendations/rebalance"
)

// EventKind says what AWS announced.
type EventKind string

const (
	// EventRebalance is an EC2 rebalance recommendation: the instance is at
	// elevated risk of interruption. gpumesh makes the node ineligible for
	// new work.
	EventRebalance EventKind = "rebalance-recommendation"
	// EventInterruption is a spot interruption notice: the instance will be
	// stopped, hibernated or terminated at Event.Time. gpumesh drains the
	// node before then.
	EventInterruption EventKind = "spot-interruption"
)

// Event is one notice from IMDS.
type Event struct {
	Kind EventKind
	// Action is "terminate", "stop" or "hibernate" for EventInterruption;
	// empty for EventRebalance.
	Action string
	// Time is the notice time for EventRebalance and the deadline (when the
	// action happens) for EventInterruption, as IMDS reported it (UTC).
	Time time.Time
	// Observed is when the watcher first saw the notice (the watcher's clock).
	Observed time.Time
}

// Deadline returns the interruption deadline, or the zero time for other
// kinds of event.
func (e Event) Deadline() time.Time {
	if e.Kind == EventInterruption {
		return e.Time
	}
	return time.Time{}
}

func (e Event) String() string {
	if e.Kind == EventInterruption {
		return fmt.Sprintf("%s: %s at %s", e.Kind, e.Action, e.Time.Format(time.RFC3339))
	}
	return fmt.Sprintf("%s at %s", e.Kind, e.Time.Format(time.RFC3339))
}

// WatcherConfig configures the interruption watcher.
type WatcherConfig struct {
	// Interval between polls of both paths. Default 5 s (AWS recommends
	// polling every 5 s; the notice gives 120 s).
	Interval time.Duration
	// Logger receives poll failures (once per failure streak) and events.
	// Default: a null logger.
	Logger hclog.Logger
	// Now is the clock for Event.Observed. Default time.Now.
	Now func() time.Time
}

// DefaultWatcherConfig returns the defaults.
func DefaultWatcherConfig() WatcherConfig {
	return WatcherConfig{Interval: 5 * time.Second}
}

// Validate checks the configuration.
func (c WatcherConfig) Validate() error {
	if c.Interval <= 0 {
		return fmt.Errorf("%w: watcher interval must be > 0, got %s", ErrInvalidConfig, c.Interval)
	}
	return nil
}

// Watcher polls IMDS for spot interruption notices and rebalance
// recommendations and delivers each kind of event at most once.
//
// Threading: Events returns a channel with room for every event the watcher
// can ever send (one of each kind), so the watcher never blocks on a slow
// reader and a reader may take its time. The watcher's single goroutine is
// the only sender; the channel is closed when that goroutine exits: after
// the context given to StartWatcher is cancelled, after Stop, or once both
// kinds have been delivered (nothing more can come). Stop is safe to call
// more than once and from any goroutine; it returns after the goroutine
// has exited.
type Watcher struct {
	md     Metadata
	cfg    WatcherConfig
	log    hclog.Logger
	events chan Event

	cancel   context.CancelFunc
	done     chan struct{}
	stopOnce sync.Once
}

// StartWatcher validates cfg (zero fields take defaults), polls once right
// away and then every Interval, until ctx is cancelled or Stop is called.
func StartWatcher(ctx context.Context, md Metadata, cfg WatcherConfig) (*Watcher, error) {
	if md == nil {
		return nil, fmt.Errorf("%w: watcher needs a metadata source (NewIMDS or MemMetadata)", ErrInvalidConfig)
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultWatcherConfig().Interval
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	ctx, cancel := context.WithCancel(ctx)
	w := &Watcher{
		md:     md,
		cfg:    cfg,
		log:    cfg.Logger.Named("spot-watcher"),
		events: make(chan Event, 2),
		cancel: cancel,
		done:   make(chan struct{}),
	}
	go w.run(ctx)
	return w, nil
}

// Events returns the channel of events (see the type's threading notes).
func (w *Watcher) Events() <-chan Event { return w.events }

// Done is closed when the watcher's goroutine has exited.
func (w *Watcher) Done() <-chan struct{} { return w.done }

// Stop stops polling and waits for the goroutine to exit. Idempotent.
func (w *Watcher) Stop() {
	w.stopOnce.Do(w.cancel)
	<-w.done
}

func (w *Watcher) run(ctx context.Context) {
	defer close(w.done)
	defer close(w.events)
	defer w.cancel()
	t := time.NewTicker(w.cfg.Interval)
	defer t.Stop()
	var sawRebalance, sawInterruption bool
	failing := map[string]bool{}
	for {
		if !sawInterruption {
			if ev, ok := w.poll(ctx, PathSpotInstanceAction, failing); ok {
				sawInterruption = true
				w.emit(ev)
			}
		}
		if !sawRebalance {
			if ev, ok := w.poll(ctx, PathRebalance, failing); ok {
				sawRebalance = true
				w.emit(ev)
			}
		}
		if sawInterruption && sawRebalance {
			w.log.Debug("both notices delivered; watcher stops")
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (w *Watcher) emit(ev Event) {
	w.log.Warn("EC2 notice", "kind", ev.Kind, "action", ev.Action, "time", ev.Time.Format(time.RFC3339))
	w.events <- ev // never blocks: capacity 2, at most one event of each kind
}

func (w *Watcher) poll(ctx context.Context, path string, failing map[string]bool) (Event, bool) {
	body, err := w.md.Get(ctx, path)
	if err != nil {
		if errors.Is(err, ErrMetadataNotFound) || ctx.Err() != nil {
			if failing[path] {
				w.log.Info("imds answers again", "path", path)
				failing[path] = false
			}
			return Event{}, false
		}
		if !failing[path] {
			w.log.Warn("imds poll failed; will retry", "path", path, "error", err)
			failing[path] = true
		}
		return Event{}, false
	}
	if failing[path] {
		w.log.Info("imds answers again", "path", path)
		failing[path] = false
	}
	var ev Event
	switch path {
	case PathSpotInstanceAction:
		ev, err = ParseInstanceAction(body)
	default:
		ev, err = ParseRebalance(body)
	}
	if err != nil {
		w.log.Error("unreadable notice; will retry", "path", path, "body", body, "error", err)
		return Event{}, false
	}
	ev.Observed = w.cfg.Now()
	return ev, true
}

// ParseInstanceAction parses the body of spot/instance-action,
// {"action": "terminate", "time": "2017-09-18T08:22:00Z"}.
func ParseInstanceAction(body string) (Event, error) {
	var v struct {
		Action string `json:"action"`
		Time   string `json:"time"`
	}
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		return Event{}, fmt.Errorf("spot instance-action: %w", err)
	}
	t, err := time.Parse(time.RFC3339, strings.TrimSpace(v.Time))
	if err != nil {
		return Event{}, fmt.Errorf("spot instance-action time %q: %w", v.Time, err)
	}
	if v.Action == "" {
		return Event{}, fmt.Errorf("spot instance-action: no action in %q", body)
	}
	return Event{Kind: EventInterruption, Action: v.Action, Time: t.UTC()}, nil
}

// ParseRebalance parses the body of events/recommendations/rebalance,
// {"noticeTime": "2020-11-05T08:22:00Z"}.
func ParseRebalance(body string) (Event, error) {
	var v struct {
		NoticeTime string `json:"noticeTime"`
	}
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		return Event{}, fmt.Errorf("rebalance recommendation: %w", err)
	}
	t, err := time.Parse(time.RFC3339, strings.TrimSpace(v.NoticeTime))
	if err != nil {
		return Event{}, fmt.Errorf("rebalance recommendation noticeTime %q: %w", v.NoticeTime, err)
	}
	return Event{Kind: EventRebalance, Time: t.UTC()}, nil
}
