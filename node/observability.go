package node

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/gpumesh/gpumesh/node/dashboard"
)

// registerObservability serves /metrics (the agent's own Prometheus
// registry), the dashboard at / and its JSON feed at /v1/dashboard, and
// this node's GPU sample at /v1/gpus.
func registerObservability(a *Agent, mux *http.ServeMux) {
	o := newMetrics(a)
	mux.Handle("/metrics", promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{Registry: o.reg}))
	mux.HandleFunc("/v1/dashboard", o.handleDashboard)
	mux.HandleFunc("/v1/gpus", o.handleGPUs)
	mux.Handle("/", dashboard.Handler())
}
