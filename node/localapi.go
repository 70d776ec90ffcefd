package node

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/localapi"
)

// localAPI is the agent's side of the PyTorch backend: the local API
// server (package localapi) on a socket in the data dir, and the key from
// which every exec task's secret is derived.
type localAPI struct {
	srv  *localapi.Server
	key  []byte
	ckpt *ckptService // checkpoint requests (checkpoint_local.go)
}

const (
	localAPISocketName = "localapi.sock"
	localAPIKeyName    = "localapi.key"
)

// EnvLocalAPIOff is set in every exec task of an agent whose local API is
// off, in place of the local API's variables: which agent, why, and what to
// do. The PyTorch backend quotes it when a rank asks for it.
const EnvLocalAPIOff = "GPUMESH_LOCAL_API_OFF"

// startLocalAPI starts the local API. A data dir too long for a Unix socket
// path leaves it off (logged): exec jobs then get no GPUMESH_LOCAL_SOCKET or
// GPUMESH_LOCAL_SECRET but EnvLocalAPIOff, and the PyTorch backend says why.
func startLocalAPI(a *Agent) error {
	dir := mustAbs(a.cfg.DataDir)
	key, err := loadLocalAPIKey(filepath.Join(dir, localAPIKeyName))
	if err != nil {
		return fmt.Errorf("local API key: %w", err)
	}
	cc := a.collectiveConfig(0)
	ckpt := newCkptService(a)
	srv, err := localapi.Listen(localapi.Config{
		Checkpointer: ckpt,
		SocketPath:   filepath.Join(dir, localAPISocketName),
		Transport:    a.data.tr,
		Collective:   cc,
		Authorizer:   &localAuth{a: a, key: key},
		Logger:       a.logger.Named("localapi"),
	})
	if err != nil {
		a.logger.Warn("the local data-plane API (PyTorch backend) is off", "error", err)
		a.localOff = fmt.Sprintf("agent %s runs without its local API: %v", a.cfg.NodeName, err)
		return nil
	}
	a.local = &localAPI{srv: srv, key: key, ckpt: ckpt}
	return nil
}

func closeLocalAPI(a *Agent) {
	if a.local != nil {
		_ = a.local.srv.Close()
	}
}

// loadLocalAPIKey reads the key, creating it (0600) on first start, so that
// tasks that outlive an agent restart keep valid secrets.
func loadLocalAPIKey(p string) ([]byte, error) {
	if b, err := os.ReadFile(p); err == nil && len(b) == 64 {
		if k, err := hex.DecodeString(string(b)); err == nil {
			return k, nil
		}
	}
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, err
	}
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, []byte(hex.EncodeToString(k)), 0o600); err != nil {
		return nil, err
	}
	return k, os.Rename(tmp, p)
}

// localSecret is the secret of one task: an HMAC of its job, generation
// and rank under the agent's key.
func localSecret(key []byte, job string, gen uint64, rank int) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("gpumesh-localapi\x00" + job + "\x00" + strconv.FormatUint(gen, 10) + "\x00" + strconv.Itoa(rank)))
	return hex.EncodeToString(m.Sum(nil))
}

// localAPIEnv is what an exec task needs to reach the local API.
func (a *Agent) localAPIEnv(al *pb.Allocation) map[string]string {
	if a.local == nil {
		if a.localOff == "" {
			return nil
		}
		return map[string]string{EnvLocalAPIOff: a.localOff}
	}
	return map[string]string{
		localapi.EnvSocket: a.local.srv.SocketPath(),
		localapi.EnvSecret: localSecret(a.local.key, al.JobId, al.Generation, int(al.Rank)),
	}
}

// localAuth admits a rank process whose secret matches and whose allocation
// runs on this node in its job's current generation.
type localAuth struct {
	a   *Agent
	key []byte
}

func (l *localAuth) Authorize(ctx context.Context, h *localapi.Hello) ([]string, error) {
	want := localSecret(l.key, h.Job, h.Generation, h.Rank)
	if !hmac.Equal([]byte(want), []byte(h.Secret)) {
		return nil, fmt.Errorf("%w: wrong secret for rank %d of job %s generation %d (use the GPUMESH_LOCAL_SECRET of the task's own environment)", localapi.ErrDenied, h.Rank, h.Job, h.Generation)
	}
	cs := &controlServer{a: l.a}
	for {
		resp, err := cs.GetJob(ctx, &pb.GetJobRequest{Id: h.Job, Query: &pb.QueryOptions{Stale: true}})
		if err != nil {
			return nil, fmt.Errorf("%w: looking up job %s: %v", localapi.ErrDenied, h.Job, err)
		}
		if resp.Job.Generation > h.Generation {
			return nil, fmt.Errorf("%w: job %s is at generation %d; this process belongs to generation %d", localapi.ErrDenied, h.Job, resp.Job.Generation, h.Generation)
		}
		var ranks []*pb.Allocation
		var me *pb.Allocation
		for _, o := range resp.Allocations {
			if o.Generation != h.Generation {
				continue
			}
			ranks = append(ranks, o)
			if int(o.Rank) == h.Rank {
				me = o
			}
		}
		if me != nil && (me.NodeId != l.a.nodeID || me.DesiredStatus == consensus.DesiredStop || consensus.AllocTerminal(me.ClientStatus)) {
			return nil, fmt.Errorf("%w: rank %d of job %s generation %d does not run on this node", localapi.ErrDenied, h.Rank, h.Job, h.Generation)
		}
		sort.Slice(ranks, func(i, k int) bool { return ranks[i].Rank < ranks[k].Rank })
		if me != nil && len(ranks) == int(me.WorldSize) {
			addrs := make([]string, len(ranks))
			for i, o := range ranks {
				if int(o.Rank) != i || o.RankAddr == "" {
					return nil, fmt.Errorf("%w: generation %d has no address for rank %d", localapi.ErrDenied, h.Generation, i)
				}
				addrs[i] = o.RankAddr
			}
			return addrs, nil
		}
		// A stale replica may not hold the whole plan yet.
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: rank %d of job %s generation %d is not placed on this node", localapi.ErrDenied, h.Rank, h.Job, h.Generation)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// withEnv returns env with the variables of extra set (replacing any
// earlier value).
func withEnv(env []string, extra map[string]string) []string {
	if len(extra) == 0 {
		return env
	}
	out := make([]string, 0, len(env)+len(extra))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := extra[k]; !ok {
			out = append(out, kv)
		}
	}
	for k, v := range extra {
		out = append(out, k+"="+v)
	}
	return out
}
