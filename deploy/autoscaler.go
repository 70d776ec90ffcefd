package deploy

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Demand is what the leader's scheduler knows when the autoscaler asks.
type Demand struct {
	// WaitingJobs is how many gang jobs wait for capacity.
	WaitingJobs int
	// NodesNeeded is how many more nodes they need beyond free capacity.
	NodesNeeded int
	// Members maps the EC2 instance IDs of live cluster members to the time
	// each became idle (no allocations); the zero time means busy. Members
	// that are not in the fleet are ignored.
	Members map[string]time.Time
}

// DemandFunc returns the current demand. It is called from the
// autoscaler's goroutine and must not block for long.
type DemandFunc func(ctx context.Context) (Demand, error)

// AutoscalerConfig configures an Autoscaler.
type AutoscalerConfig struct {
	// Interval between steps. Default 30 s.
	Interval time.Duration
	// OnChange is called (from the autoscaler's goroutine) after a decision
	// that changed the target or terminated instances has been applied, for
	// the log and `gpumesh nodes`. Optional; must not block.
	OnChange func(ScaleDecision)
	// Logger. Default: a null logger.
	Logger hclog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Autoscaler runs a FleetScaler against the scheduler's demand: every
// Interval it reads the fleet (DescribeFleets, DescribeFleetInstances),
// asks for the demand, decides (DecideScale) and applies the decision. The
// leader starts one when it gains leadership and stops it when it loses it;
// the time of the last change (for the scale-down cooldown) lives in the
// Autoscaler, so a new leader starts without a cooldown.
type Autoscaler struct {
	s      *FleetScaler
	demand DemandFunc
	cfg    AutoscalerConfig
	log    hclog.Logger

	mu         sync.Mutex
	lastChange time.Time
	last       ScaleDecision
	lastAt     time.Time

	cancel   context.CancelFunc
	done     chan struct{}
	stopOnce sync.Once
}

// NewAutoscaler returns an autoscaler that has not started; call Step
// yourself or Start.
func NewAutoscaler(s *FleetScaler, demand DemandFunc, cfg AutoscalerConfig) (*Autoscaler, error) {
	if s == nil || demand == nil {
		return nil, fmt.Errorf("%w: the autoscaler needs a fleet scaler and a demand function", ErrInvalidConfig)
	}
	if cfg.Interval == 0 {
		cfg.Interval = 30 * time.Second
	}
	if cfg.Interval < 0 {
		return nil, fmt.Errorf("%w: autoscaler interval must be > 0, got %s", ErrInvalidConfig, cfg.Interval)
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Autoscaler{s: s, demand: demand, cfg: cfg, log: cfg.Logger.Named("autoscaler"), done: make(chan struct{})}, nil
}

// Start runs Step every Interval until ctx is cancelled or Stop is called.
// Errors are logged and retried at the next step. Call Start once.
func (a *Autoscaler) Start(ctx context.Context) {
	ctx, a.cancel = context.WithCancel(ctx)
	go func() {
		defer close(a.done)
		t := time.NewTicker(a.cfg.Interval)
		defer t.Stop()
		for {
			if _, err := a.Step(ctx); err != nil && ctx.Err() == nil {
				a.log.Warn("autoscaler step failed; will retry", "error", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// Stop stops a started autoscaler and waits for its goroutine. Idempotent;
// a no-op on one that was never started.
func (a *Autoscaler) Stop() {
	a.stopOnce.Do(func() {
		if a.cancel == nil {
			close(a.done)
			return
		}
		a.cancel()
	})
	<-a.done
}

// Last returns the last applied change and when it was applied (zero if
// none yet).
func (a *Autoscaler) Last() (ScaleDecision, time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.last, a.lastAt
}

// Step reads the fleet and the demand, decides and applies; it returns the
// decision (applied when it changes anything). Safe to call from one
// goroutine at a time.
func (a *Autoscaler) Step(ctx context.Context) (ScaleDecision, error) {
	st, err := a.s.Status(ctx)
	if err != nil {
		return ScaleDecision{}, err
	}
	insts, err := a.s.Instances(ctx)
	if err != nil {
		return ScaleDecision{}, err
	}
	dem, err := a.demand(ctx)
	if err != nil {
		return ScaleDecision{}, fmt.Errorf("autoscaler demand: %w", err)
	}
	now := a.cfg.Now()
	a.mu.Lock()
	lastChange := a.lastChange
	a.mu.Unlock()
	state := ScaleState{Now: now, Target: st.TotalTarget, WaitingJobs: dem.WaitingJobs, NodesNeeded: dem.NodesNeeded, LastChange: lastChange}
	for _, in := range insts {
		since, ok := dem.Members[in.InstanceID]
		if !ok {
			continue
		}
		state.Joined++
		if !since.IsZero() {
			state.Idle = append(state.Idle, IdleNode{InstanceID: in.InstanceID, Since: since})
		}
	}
	d := a.s.Decide(state)
	if d.Target == st.TotalTarget && len(d.Remove) == 0 {
		a.log.Debug("no fleet change", "target", st.TotalTarget, "joined", state.Joined, "reason", d.Reason)
		return d, nil
	}
	if err := a.s.Apply(ctx, st.TotalTarget, d); err != nil {
		return d, err
	}
	a.mu.Lock()
	if d.Target != st.TotalTarget {
		a.lastChange = now
	}
	a.last, a.lastAt = d, now
	a.mu.Unlock()
	if a.cfg.OnChange != nil {
		a.cfg.OnChange(d)
	}
	return d, nil
}
