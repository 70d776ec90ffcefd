package node

import (
	"encoding/json"
	"net/http"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
)

// httpHandler serves health, metrics and the dashboard on the HTTP port.
func (a *Agent) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/health", a.handleHealth)
	mux.HandleFunc("/v1/agent", a.handleAgent)
	mux.HandleFunc("/v1/services", a.handleServices)
	registerObservability(a, mux)
	// Service traffic (/svc/NAME/...) is the services' own: their clients
	// hold no cluster token, and its methods are the service's to allow,
	// so the agent API's rule (read-only, token) does not apply to it.
	outer := http.NewServeMux()
	outer.Handle(svcPrefix, a.router)
	outer.Handle("/", a.sec.httpAuth(mux))
	return hostRouted(a.router, outer)
}

// handleHealth answers 200 when the agent is up and, for servers, knows a
// leader; 503 otherwise. Load balancers use it.
func (a *Agent) handleHealth(w http.ResponseWriter, r *http.Request) {
	type health struct {
		Status string `json:"status"`
		Node   string `json:"node"`
		Role   string `json:"role"`
		Leader string `json:"leader,omitempty"`
		Time   string `json:"time"`
	}
	h := health{Status: "ok", Node: a.cfg.NodeName, Role: a.Role(), Time: time.Now().UTC().Format(time.RFC3339)}
	code := http.StatusOK
	ok, leader := a.healthy() // the gRPC health service follows the same rule
	h.Leader = leader
	if !ok {
		h.Status, code = "no leader", http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(h)
}

func (a *Agent) handleAgent(w http.ResponseWriter, r *http.Request) {
	resp, _ := (&controlServer{a: a}).AgentInfo(r.Context(), nil)
	b, _ := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(resp)
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}
