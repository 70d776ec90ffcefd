package node

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// Replica health values, as stored in Allocation.health.
const (
	HealthStarting  = consensus.HealthStarting
	HealthHealthy   = consensus.HealthHealthy
	HealthUnhealthy = consensus.HealthUnhealthy
	HealthDraining  = consensus.HealthDraining
)

// healthState is the health of one replica as a function of its probe
// results: a replica is starting until its first probe passes (failures
// within the grace period do not count), healthy from then on, unhealthy
// after threshold failures in a row, and healthy again at the next pass.
// It reads no clock: the caller passes the time.
type healthState struct {
	threshold int
	graceEnd  time.Time
	status    string
	fails     int
}

func newHealthState(started time.Time, threshold int, grace time.Duration) *healthState {
	return &healthState{threshold: threshold, graceEnd: started.Add(grace), status: HealthStarting}
}

// observe records one probe and returns the status after it.
func (h *healthState) observe(ok bool, now time.Time) string {
	if ok {
		h.fails = 0
		h.status = HealthHealthy
		return h.status
	}
	if h.status == HealthStarting && now.Before(h.graceEnd) {
		return h.status
	}
	h.fails++
	if h.fails >= h.threshold {
		h.status = HealthUnhealthy
	}
	return h.status
}

// probe runs one health check of a replica listening on host:port.
func probe(ctx context.Context, c *pb.HealthCheck, host string, port int, client *http.Client) bool {
	ctx, cancel := context.WithTimeout(ctx, c.GetTimeout().AsDuration())
	defer cancel()
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	if c.GetType() == jobspec.CheckTCP {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return false
		}
		_ = conn.Close()
		return true
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+c.GetPath(), nil)
	if err != nil {
		return false
	}
	req.Header.Set("User-Agent", "gpumesh-health")
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return resp.StatusCode >= 200 && resp.StatusCode < 400
}

// checkLoop probes a local replica every interval until ctx ends and calls
// report with each new status (the first one included).
func checkLoop(ctx context.Context, c *pb.HealthCheck, host string, port int, started time.Time, report func(string)) {
	client := &http.Client{
		Transport: &http.Transport{DisableKeepAlives: true},
		// A redirect counts as an answer; do not follow it.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	h := newHealthState(started, int(c.GetThreshold()), c.GetGrace().AsDuration())
	last := ""
	t := time.NewTicker(c.GetInterval().AsDuration())
	defer t.Stop()
	for {
		st := h.observe(probe(ctx, c, host, port, client), time.Now())
		if ctx.Err() != nil {
			return
		}
		if st != last {
			last = st
			report(st)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
