package jobspec

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// TypeService is a long-running job whose ranks are replicas of a server:
// it never completes, the agent allocates its named ports and checks its
// health, and every agent routes /svc/NAME/ to a healthy replica.
const TypeService = "service"

// Service defaults and limits.
const (
	// DefaultServicePort is the port name a service without ports gets.
	DefaultServicePort = "http"
	// MaxServicePorts bounds the named ports of one service.
	MaxServicePorts = 16
	// DefaultCheckInterval is the time between health probes.
	DefaultCheckInterval = 2 * time.Second
	// DefaultCheckTimeout bounds one health probe.
	DefaultCheckTimeout = time.Second
	// DefaultCheckThreshold is how many consecutive failed probes make a
	// healthy replica unhealthy.
	DefaultCheckThreshold = 3
	// DefaultCheckGrace is how long after a replica starts failed probes
	// do not count (model loads are slow); the first passing probe ends it.
	DefaultCheckGrace = 60 * time.Second
	// DefaultDrainTimeout is how long in-flight requests of a replica that
	// is being moved may take to finish.
	DefaultDrainTimeout = 30 * time.Second
	// DefaultTargetInFlight is the requests in flight per replica that a
	// service scaled by load (service.max_replicas set) aims at.
	DefaultTargetInFlight = 4
	// DefaultScaleInCooldown is how long the load of a service scaled by
	// load must stay low before a replica is removed.
	DefaultScaleInCooldown = 5 * time.Minute
	// MaxScaleInCooldown bounds scale_in_cooldown (the leader keeps that
	// much of a service's load history).
	MaxScaleInCooldown = time.Hour
	// DefaultRestartMaxDelay caps a service's crash-loop back-off
	// (restart.max_delay): a replica slot whose replicas keep failing waits
	// restart.delay, then twice as long after each further failure in a
	// row, up to this.
	DefaultRestartMaxDelay = 5 * time.Minute
	// DefaultRestartResetAfter is how long a service replica must stay
	// healthy before its end no longer counts as one more failure in a row
	// of its slot (restart.reset_after).
	DefaultRestartResetAfter = 10 * time.Minute
	// MaxRestartBackoff bounds restart.max_delay and restart.reset_after.
	MaxRestartBackoff = 24 * time.Hour
)

// Health check types.
const (
	CheckHTTP = "http"
	CheckTCP  = "tcp"
)

var portNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,30}$`)

// PortEnv is the environment variable that carries a named port to a
// replica: GPUMESH_PORT_<NAME in upper case>.
func PortEnv(name string) string { return "GPUMESH_PORT_" + strings.ToUpper(name) }

func applyServiceDefaults(s *pb.JobSpec) {
	if v := s.Service; v != nil && v.MaxReplicas > 0 {
		// Scaled by load: it starts with min_replicas unless told.
		if v.MinReplicas == 0 {
			v.MinReplicas = 1
		}
		if v.TargetInFlight == 0 {
			v.TargetInFlight = DefaultTargetInFlight
		}
		if v.ScaleInCooldown == nil {
			v.ScaleInCooldown = durationpb.New(DefaultScaleInCooldown)
		}
		if s.Replicas == 0 && s.Ranks == 0 {
			s.Replicas = v.MinReplicas
		}
	}
	if s.Ranks == 0 && s.MinRanks == 0 {
		s.Ranks = s.Replicas
	}
	if s.Replicas == 0 {
		s.Replicas = s.Ranks
	}
	if s.Service == nil {
		s.Service = &pb.ServiceSpec{}
	}
	v := s.Service
	if len(v.Ports) == 0 {
		v.Ports = []string{DefaultServicePort}
	}
	if v.RoutePort == "" {
		v.RoutePort = v.Ports[0]
	}
	if v.Check == nil {
		v.Check = &pb.HealthCheck{}
	}
	c := v.Check
	if c.Port == "" {
		c.Port = v.RoutePort
	}
	if c.Type == "" {
		c.Type = CheckHTTP
	}
	if c.Path == "" && c.Type == CheckHTTP {
		c.Path = "/"
	}
	if c.Interval == nil {
		c.Interval = durationpb.New(DefaultCheckInterval)
	}
	if c.Timeout == nil {
		c.Timeout = durationpb.New(DefaultCheckTimeout)
	}
	if c.Threshold == 0 {
		c.Threshold = DefaultCheckThreshold
	}
	if c.Grace == nil {
		c.Grace = durationpb.New(DefaultCheckGrace)
	}
	if v.DrainTimeout == nil {
		v.DrainTimeout = durationpb.New(DefaultDrainTimeout)
	}
}

// validateNotService reports service fields on a job of another type.
func validateNotService(s *pb.JobSpec, add report) {
	if s.Type == TypeService {
		return
	}
	if s.Replicas != 0 {
		add("replicas", "replicas is for service jobs (type: service); use ranks")
	}
	if s.Service != nil {
		add("service", "%s jobs take no service section (or set type: service)", s.Type)
	}
	if r := s.Restart; r != nil && (r.MaxDelay != nil || r.ResetAfter != nil) {
		add("restart", "max_delay and reset_after are the crash-loop back-off of service jobs (type: service); %s jobs restart after restart.delay", s.Type)
	}
}

func validateService(s *pb.JobSpec, add report) {
	validateExec(s, add)
	if s.Replicas != s.Ranks && s.MinRanks == 0 {
		add("replicas", "replicas (%d) and ranks (%d) disagree; give one of them", s.Replicas, s.Ranks)
	}
	v := s.Service
	if v == nil {
		add("service", "a service job needs a service section")
		return
	}
	if len(v.Ports) > MaxServicePorts {
		add("service.ports", "at most %d ports, got %d", MaxServicePorts, len(v.Ports))
	}
	seen := map[string]int{}
	for i, p := range v.Ports {
		field := fmt.Sprintf("service.ports[%d]", i)
		if !portNameRE.MatchString(p) {
			add(field, "%q is not a valid port name: use 1-31 lower-case letters, digits or '_', starting with a letter (it becomes %s)", p, PortEnv("name"))
			continue
		}
		if j, dup := seen[p]; dup {
			add(field, "port name %q collides with service.ports[%d]; give every port its own name", p, j)
			continue
		}
		seen[p] = i
	}
	if _, ok := seen[v.RoutePort]; !ok {
		add("service.route_port", "%q is not one of the service's ports (%s)", v.RoutePort, strings.Join(v.Ports, ", "))
	}
	validateScale(s, add)
	validateBackoff(s.Restart, add)
	for k := range s.GetExec().GetEnv() {
		if strings.HasPrefix(k, "GPUMESH_PORT_") {
			add("exec.env", "%s is set by the agent from service.ports; remove it from exec.env", k)
		}
	}
	c := v.Check
	if c == nil {
		return
	}
	if _, ok := seen[c.Port]; !ok {
		add("service.check.port", "%q is not one of the service's ports (%s)", c.Port, strings.Join(v.Ports, ", "))
	}
	switch c.Type {
	case CheckHTTP:
		if !strings.HasPrefix(c.Path, "/") {
			add("service.check.path", "must start with '/', got %q", c.Path)
		}
	case CheckTCP:
		if c.Path != "" {
			add("service.check.path", "a tcp check takes no path (or set type: http)")
		}
	default:
		add("service.check.type", "unknown check type %q; use http or tcp", c.Type)
	}
	iv := c.Interval.AsDuration()
	if iv < 100*time.Millisecond || iv > time.Hour {
		add("service.check.interval", "must be between 100ms and 1h, got %s", iv)
	}
	if to := c.Timeout.AsDuration(); to <= 0 || to > iv {
		add("service.check.timeout", "must be > 0 and at most the interval (%s), got %s", iv, to)
	}
	if c.Threshold < 1 || c.Threshold > 100 {
		add("service.check.threshold", "must be between 1 and 100, got %d", c.Threshold)
	}
	if g := c.Grace.AsDuration(); g < 0 || g > 24*time.Hour {
		add("service.check.grace", "must be between 0s and 24h, got %s", g)
	}
	if d := v.DrainTimeout.AsDuration(); d < 0 || d > time.Hour {
		add("service.drain_timeout", "must be between 0s and 1h, got %s", d)
	}
}

// validateBackoff checks a service's crash-loop back-off (restart.max_delay
// and restart.reset_after; left out, the scheduler uses the defaults).
func validateBackoff(r *pb.RestartPolicy, add report) {
	if r == nil {
		return
	}
	delay := r.Delay.AsDuration()
	if r.MaxDelay != nil {
		if d := r.MaxDelay.AsDuration(); d < delay || d > MaxRestartBackoff {
			add("restart.max_delay", "must be between restart.delay (%s) and %s, got %s", delay, MaxRestartBackoff, d)
		}
	}
	if r.ResetAfter != nil {
		if d := r.ResetAfter.AsDuration(); d < 0 || d > MaxRestartBackoff {
			add("restart.reset_after", "must be between 0s and %s, got %s", MaxRestartBackoff, d)
		}
	}
}

// validateScale checks the scale-by-load fields of a service.
func validateScale(s *pb.JobSpec, add report) {
	v := s.Service
	if v.MaxReplicas == 0 {
		if v.MinReplicas != 0 || v.TargetInFlight != 0 || v.ScaleInCooldown != nil {
			add("service.max_replicas", "min_replicas, target_in_flight and scale_in_cooldown scale a service by load, which needs max_replicas")
		}
		return
	}
	if v.MinReplicas < 1 {
		add("service.min_replicas", "must be >= 1, got %d", v.MinReplicas)
	}
	if v.MaxReplicas < v.MinReplicas || v.MaxReplicas > MaxRanks {
		add("service.max_replicas", "must be between min_replicas (%d) and %d, got %d", v.MinReplicas, MaxRanks, v.MaxReplicas)
	}
	if s.Replicas < v.MinReplicas || s.Replicas > v.MaxReplicas {
		add("replicas", "the replicas to start with (%d) must be between service.min_replicas (%d) and service.max_replicas (%d); leave it out to start with min_replicas", s.Replicas, v.MinReplicas, v.MaxReplicas)
	}
	if t := v.TargetInFlight; !(t > 0 && t <= 1e6) {
		add("service.target_in_flight", "must be > 0 and at most 1e6 requests in flight per replica, got %g", t)
	}
	if d := v.ScaleInCooldown.AsDuration(); d < 0 || d > MaxScaleInCooldown {
		add("service.scale_in_cooldown", "must be between 0s and %s, got %s", MaxScaleInCooldown, d)
	}
}
