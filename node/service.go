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

// serviceTask is one service replica: an exec task whose named ports this
// agent allocated, health-checked while it runs.
type serviceTask struct {
	task
	ports  map[string]int32
	cancel context.CancelFunc

	mu       sync.Mutex
	draining bool
}

// Ports returns the named ports the replica listens on.
func (t *serviceTask) Ports() map[string]int32 { return t.ports }

// Stop stops health checks and the replica's process.
func (t *serviceTask) Stop(reason string, deadline time.Time) {
	t.cancel()
	t.task.Stop(reason, deadline)
}

// allocatePorts picks a free TCP port on host for every name. The ports
// are free when picked; the replica binds them itself.
func allocatePorts(host string, names []string) (map[string]int32, error) {
	out := make(map[string]int32, len(names))
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			_ = ln.Close()
		}
	}()
	for _, n := range names {
		// Hold every listener until all are picked, so two names never
		// get the same port.
		ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, fmt.Errorf("allocating port %q: %w", n, err)
		}
		lns = append(lns, ln)
		out[n] = int32(ln.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
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
	ports, err := allocatePorts(host, spec.GetPorts())
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
	go func() {
		<-t.Done()
		cancel()
	}()
	if c := spec.GetCheck(); c != nil {
		port := int(ports[c.GetPort()])
		started := time.Now()
		r.goFunc(func() {
			checkLoop(cctx, c, host, port, started, func(h string) {
				r.logger.Info("replica health", "job", al.JobId, "service", j.Spec.Name, "rank", al.Rank, "health", h)
				r.reportHealth(al, h)
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
