package jobspec

import (
	"strings"
	"testing"
	"time"
)

func TestParseService(t *testing.T) {
	spec, err := Parse([]byte(`
name: echo
type: service
replicas: 2
exec: {command: [python3, server.py]}
service:
  ports: [http, metrics]
  check: {path: /healthz, interval: 500ms, timeout: 200ms, threshold: 2, grace: 2m}
`))
	if err != nil {
		t.Fatal(err)
	}
	if spec.Ranks != 2 || spec.Replicas != 2 {
		t.Fatalf("replicas not mirrored into ranks: ranks %d replicas %d", spec.Ranks, spec.Replicas)
	}
	v := spec.Service
	if v.RoutePort != "http" || v.Check.Port != "http" || v.Check.Type != CheckHTTP {
		t.Fatalf("defaults: %v", v)
	}
	if v.Check.Interval.AsDuration() != 500*time.Millisecond || v.Check.Threshold != 2 || v.Check.Grace.AsDuration() != 2*time.Minute {
		t.Fatalf("check not parsed: %v", v.Check)
	}
	if v.DrainTimeout.AsDuration() != DefaultDrainTimeout {
		t.Fatalf("drain timeout default: %v", v.DrainTimeout)
	}
	// The smallest service: ranks given, one port named http, checked on /.
	min, err := Parse([]byte("type: service\nranks: 1\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if min.Replicas != 1 || len(min.Service.Ports) != 1 || min.Service.Ports[0] != DefaultServicePort || min.Service.Check.Path != "/" {
		t.Fatalf("defaults of the smallest service: %v", min)
	}
	if PortEnv("http") != "GPUMESH_PORT_HTTP" {
		t.Fatalf("PortEnv(http) = %s", PortEnv("http"))
	}
}

func TestParseServiceBackoff(t *testing.T) {
	spec, err := Parse([]byte("type: service\nreplicas: 1\nexec: {command: [srv]}\nrestart: {delay: 1s, max_delay: 2m, reset_after: 30m}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if r := spec.Restart; r.Delay.AsDuration() != time.Second || r.MaxDelay.AsDuration() != 2*time.Minute || r.ResetAfter.AsDuration() != 30*time.Minute {
		t.Fatalf("restart not parsed: %v", r)
	}
	// Left out, they stay unset (the scheduler's defaults apply), so a
	// service's spec stored before they existed equals the same file
	// parsed now (no rolling update for nothing).
	spec, err = Parse([]byte("type: service\nreplicas: 1\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if spec.Restart.MaxDelay != nil || spec.Restart.ResetAfter != nil {
		t.Fatalf("back-off defaults written into the spec: %v", spec.Restart)
	}
}

func TestParseServiceScaledByLoad(t *testing.T) {
	spec, err := Parse([]byte("type: service\nexec: {command: [srv]}\nservice: {min_replicas: 2, max_replicas: 5}\n"))
	if err != nil {
		t.Fatal(err)
	}
	v := spec.Service
	if spec.Replicas != 2 || spec.Ranks != 2 {
		t.Fatalf("a service scaled by load starts with min_replicas: replicas %d ranks %d", spec.Replicas, spec.Ranks)
	}
	if v.TargetInFlight != DefaultTargetInFlight || v.ScaleInCooldown.AsDuration() != DefaultScaleInCooldown {
		t.Fatalf("scale defaults: target %g cooldown %v", v.TargetInFlight, v.ScaleInCooldown)
	}
	only, err := Parse([]byte("type: service\nexec: {command: [srv]}\nservice: {max_replicas: 3}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if only.Service.MinReplicas != 1 || only.Replicas != 1 {
		t.Fatalf("max_replicas alone: min %d replicas %d", only.Service.MinReplicas, only.Replicas)
	}
}

func TestParseServiceInvalid(t *testing.T) {
	cases := []struct{ name, spec, want string }{
		{"port name collision", "type: service\nreplicas: 1\nexec: {command: [srv]}\nservice: {ports: [http, grpc, http]}", `service.ports[2]: port name "http" collides with service.ports[0]`},
		{"bad port name", "type: service\nreplicas: 1\nexec: {command: [srv]}\nservice: {ports: [HTTP-1]}", `service.ports[0]: "HTTP-1" is not a valid port name`},
		{"route port unknown", "type: service\nreplicas: 1\nexec: {command: [srv]}\nservice: {ports: [http], route_port: web}", `service.route_port: "web" is not one of`},
		{"check port unknown", "type: service\nreplicas: 1\nexec: {command: [srv]}\nservice: {check: {port: admin}}", `service.check.port: "admin"`},
		{"check type", "type: service\nreplicas: 1\nexec: {command: [srv]}\nservice: {check: {type: grpc}}", "unknown check type"},
		{"timeout above interval", "type: service\nreplicas: 1\nexec: {command: [srv]}\nservice: {check: {interval: 1s, timeout: 2s}}", "service.check.timeout"},
		{"no command", "type: service\nreplicas: 1\nservice: {}", "exec.command"},
		{"replicas and ranks", "type: service\nreplicas: 2\nranks: 3\nexec: {command: [srv]}", "replicas (2) and ranks (3) disagree"},
		{"replicas on exec", "ranks: 1\nreplicas: 1\nexec: {command: [true]}", "replicas is for service jobs"},
		{"service on exec", "ranks: 1\nexec: {command: [true]}\nservice: {ports: [http]}", "exec jobs take no service section"},
		{"port env set by hand", "type: service\nreplicas: 1\nexec: {command: [srv], env: {GPUMESH_PORT_HTTP: '80'}}", "set by the agent"},
		{"no replicas", "type: service\nexec: {command: [srv]}", "ranks: must be >= 1"},
		{"scale without max", "type: service\nreplicas: 1\nexec: {command: [srv]}\nservice: {min_replicas: 1}", "needs max_replicas"},
		{"max below min", "type: service\nexec: {command: [srv]}\nservice: {min_replicas: 3, max_replicas: 2}", "service.max_replicas: must be between min_replicas (3)"},
		{"replicas outside the range", "type: service\nreplicas: 5\nexec: {command: [srv]}\nservice: {max_replicas: 4}", "replicas: the replicas to start with (5)"},
		{"negative target", "type: service\nexec: {command: [srv]}\nservice: {max_replicas: 4, target_in_flight: -1}", "service.target_in_flight"},
		{"max_delay below delay", "type: service\nreplicas: 1\nexec: {command: [srv]}\nrestart: {delay: 10s, max_delay: 5s}", "restart.max_delay: must be between restart.delay (10s) and 24h0m0s, got 5s"},
		{"negative reset_after", "type: service\nreplicas: 1\nexec: {command: [srv]}\nrestart: {reset_after: -1s}", "restart.reset_after: must be between 0s and 24h0m0s"},
		{"back-off on exec", "ranks: 1\nexec: {command: [true]}\nrestart: {max_delay: 1m}", "crash-loop back-off of service jobs"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse([]byte(c.spec))
			if err == nil {
				t.Fatalf("accepted %q", c.spec)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not contain %q", err, c.want)
			}
		})
	}
}
