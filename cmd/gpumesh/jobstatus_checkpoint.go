package main

import (
	"fmt"
	"strings"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// genCheckpoint is what one generation's ranks reported about checkpoints
// (the "checkpoint" and "checkpoint_prefetch" keys of their results, see
// node/checkpoint_prefetch.go).
type genCheckpoint struct {
	hasResumed      bool
	resumedStep     int64 // lowest resumed_step of its ranks
	last            bool
	lastStep        int64 // highest last_step of its ranks
	prefetched      bool
	prefetchBytes   int64   // largest part a rank's agent fetched
	prefetchSeconds float64 // slowest rank's agent
	prefetchErr     string
	warning         string // the newest checkpoint named no job
}

// checkpointSummary is job status's "Checkpoint" line: where the newest
// generation that loaded (or looked for) a checkpoint resumed, how many
// steps the generation before it had finished beyond that (lost), and how
// long its agents took to prefetch it. "" when no generation reported one.
// Ranks report when they end, so a running generation shows no line yet.
func checkpointSummary(allocs []*pb.Allocation) string {
	gens := map[uint64]*genCheckpoint{}
	for _, al := range allocs {
		if al.Result == nil {
			continue
		}
		r := al.Result.AsMap()
		g := gens[al.Generation]
		if g == nil {
			g = &genCheckpoint{}
		}
		if c, ok := r["checkpoint"].(map[string]any); ok {
			if v, ok := c["resumed_step"].(float64); ok && (!g.hasResumed || int64(v) < g.resumedStep) {
				g.hasResumed, g.resumedStep = true, int64(v)
			}
			if v, ok := c["last_step"].(float64); ok && (!g.last || int64(v) > g.lastStep) {
				g.last, g.lastStep = true, int64(v)
			}
		}
		if p, ok := r["checkpoint_prefetch"].(map[string]any); ok {
			if e, _ := p["error"].(string); e != "" {
				g.prefetchErr = e
			}
			if w, _ := p["warning"].(string); w != "" {
				g.warning = w
			}
			if found, _ := p["found"].(bool); found {
				g.prefetched = true
				b, _ := p["bytes"].(float64)
				s, _ := p["seconds"].(float64)
				g.prefetchBytes = max(g.prefetchBytes, int64(b))
				g.prefetchSeconds = max(g.prefetchSeconds, s)
			}
		}
		gens[al.Generation] = g
	}
	var gen uint64
	for n, g := range gens {
		if g.hasResumed && n > gen {
			gen = n
		}
	}
	if gen == 0 {
		return ""
	}
	g := gens[gen]
	var parts []string
	if g.resumedStep < 0 {
		parts = append(parts, fmt.Sprintf("generation %d started without a checkpoint", gen))
	} else {
		parts = append(parts, fmt.Sprintf("generation %d resumed at step %d", gen, g.resumedStep))
	}
	var prev uint64
	for n, p := range gens {
		if n < gen && p.last && n > prev {
			prev = n
		}
	}
	switch {
	case prev > 0:
		// Steps 0..lastStep were done; the resumed generation redoes
		// resumedStep+1..lastStep.
		lost := max(gens[prev].lastStep-g.resumedStep, 0)
		parts = append(parts, fmt.Sprintf("%d steps lost (generation %d finished step %d)", lost, prev, gens[prev].lastStep))
	case gen > 1:
		parts = append(parts, "steps lost unknown (no earlier generation reported its last step)")
	}
	switch {
	case g.prefetched:
		parts = append(parts, fmt.Sprintf("prefetch %.1f MiB in %.2f s", float64(g.prefetchBytes)/(1<<20), g.prefetchSeconds))
	case g.prefetchErr != "":
		parts = append(parts, "prefetch failed: "+g.prefetchErr)
	}
	if g.warning != "" {
		parts = append(parts, "warning: "+g.warning)
	}
	return strings.Join(parts, ", ")
}
