package node

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// drainSettle is how long a draining replica keeps running after it said
// so, before it gets SIGTERM: the time for every router to learn (through
// Raft and the watch streams) to send it nothing new. Requests still
// reaching it after that find its port closed and are retried elsewhere.
const drainSettle = time.Second

// serviceTask is one service replica: an exec task whose named ports this
// agent allocated, health-checked while it runs. On a drain or a stop it
// first says it is draining (routers stop sending to it), waits
// drainSettle, then stops the process, which finishes its in-flight
// requests within its kill timeout.
type serviceTask struct {
	task
	ports  map[string]int32
	cancel context.CancelFunc // ends the health checks
	report func(health string)

	mu       sync.Mutex
	draining bool
}

// drain stops the health checks and reports the replica draining, once.
// It returns whether this call did it.
func (t *serviceTask) drain() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.draining {
		return false
	}
	t.draining = true
	t.cancel()
	t.report(HealthDraining)
	return true
}

// Ports returns the named ports the replica listens on.
func (t *serviceTask) Ports() map[string]int32 { return t.ports }

// Stop drains the replica, then stops its process. It returns at once
// (the runner calls it holding its lock, which reporting takes).
func (t *serviceTask) Stop(reason string, deadline time.Time) {
	wait := drainSettle
	if !deadline.IsZero() {
		wait = min(wait, time.Until(deadline)/4)
	}
	go func() {
		t.drain()
		select {
		case <-time.After(wait):
		case <-t.Done():
		}
		t.task.Stop(reason, deadline)
	}()
}

// allocatePorts picks a free TCP port on host for every name, none for
// which avoid (nil: none) says true. The ports are free when picked; the
// replica binds them itself.
func allocatePorts(host string, names []string, avoid func(port int32) bool) (map[string]int32, error) {
	out := make(map[string]int32, len(names))
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			_ = ln.Close()
		}
	}()
	for _, n := range names {
		// Hold every listener until all are picked, so two names never
		// get the same port, nor a port avoided once come back.
		for try := 1; ; try++ {
			ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
			if err != nil {
				return nil, fmt.Errorf("allocating port %q: %w", n, err)
			}
			lns = append(lns, ln)
			p := int32(ln.Addr().(*net.TCPAddr).Port)
			if avoid == nil || !avoid(p) || try == maxPortTries {
				out[n] = p
				break
			}
		}
	}
	return out, nil
}

// maxPortTries bounds the picks of one named port: the system hands out
// another free port each time, so avoided ones are passed over in a try or
// two; past this the last pick is taken.
const maxPortTries = 32

// portsGivenLocked returns the ports this node's running tasks were given:
// service replicas' named ports, which a replica binds some time after
// they were picked free, and MASTER_PORTs (a rank 0's rendezvous store).
// r.mu held.
func (r *runner) portsGivenLocked() map[int32]bool {
	out := map[int32]bool{}
	for _, rt := range r.tasks {
		if rt.alloc.MasterPort > 0 {
			out[rt.alloc.MasterPort] = true
		}
		for _, p := range portsOf(rt.task) {
			out[p] = true
		}
	}
	return out
}

// startService starts a service replica: it allocates the named ports,
// passes them as GPUMESH_PORT_<NAME>, runs the command with the exec
// driver and health-checks it, reporting health changes to the leader.
func startService(ctx context.Context, r *runner, al *pb.Allocation, job *pb.Job) (task, error) {
	spec := job.Spec.GetService()
	host := r.a.cfg.BindAddr
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = hostOf(r.a.rpcAddr)
	}
	// Not a port another task of this node was given (picked free, it may
	// not be bound yet), nor this replica's MASTER_PORT. r.mu is held: the
	// runner starts tasks under it.
	given := r.portsGivenLocked()
	ports, err := allocatePorts(host, spec.GetPorts(), func(p int32) bool { return given[p] || p == al.MasterPort })
	if err != nil {
		return nil, err
	}
	j := proto.Clone(job).(*pb.Job)
	if j.Spec.Exec == nil {
		j.Spec.Exec = &pb.ExecSpec{}
	}
	env := map[string]string{}
	for k, v := range j.Spec.Exec.Env {
		env[k] = v
	}
	for name, p := range ports {
		env[jobspec.PortEnv(name)] = strconv.Itoa(int(p))
	}
	env["GPUMESH_SERVICE"] = j.Spec.Name
	env["GPUMESH_HOST"] = host
	j.Spec.Exec.Env = env
	t, err := startExec(ctx, r, al, j)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithCancel(ctx)
	st := &serviceTask{task: t, ports: ports, cancel: cancel}
	st.report = func(h string) {
		r.logger.Info("replica health", "job", al.JobId, "service", j.Spec.Name, "rank", al.Rank, "health", h)
		r.reportHealth(al, h)
	}
	go func() {
		<-t.Done()
		cancel()
	}()
	if c := spec.GetCheck(); c != nil {
		port := int(ports[c.GetPort()])
		started := time.Now()
		r.goFunc(func() {
			checkLoop(cctx, c, host, port, started, func(h string) {
				st.mu.Lock()
				defer st.mu.Unlock()
				if !st.draining {
					st.report(h)
				}
			})
		})
	}
	return st, nil
}

// reportHealth queues a health change of a running replica, merged into
// any update not yet sent.
func (r *runner) reportHealth(al *pb.Allocation, health string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	up := &pb.Allocation{Id: al.Id, JobId: al.JobId, Generation: al.Generation, Rank: al.Rank, NodeId: al.NodeId}
	if prev := r.pending[al.Id]; prev != nil {
		if consensus.AllocTerminal(prev.ClientStatus) {
			return
		}
		up = proto.Clone(prev).(*pb.Allocation)
	}
	up.Health = health
	r.pending[al.Id] = up
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// drainServices tells every router to send the service replicas of this
// node no new requests (a drain or spot notice: their replacements start
// elsewhere). The replicas keep running until the scheduler stops them.
func (r *runner) drainServices() {
	r.mu.Lock()
	var sts []*serviceTask
	for _, rt := range r.tasks {
		if st, ok := rt.task.(*serviceTask); ok {
			sts = append(sts, st)
		}
	}
	r.mu.Unlock()
	for _, st := range sts {
		st.drain()
	}
}

// portsOf returns the ports a task allocated, or nil.
func portsOf(t task) map[string]int32 {
	if p, ok := t.(interface{ Ports() map[string]int32 }); ok {
		return p.Ports()
	}
	return nil
}

func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
