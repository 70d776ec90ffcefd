package node

import (
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/gpumesh/gpumesh/node/driver"
)

// DynamicTaskUser is the --task-user value that runs every job's exec tasks
// as an account of its own: a UID (and GID of the same number) from
// Config.TaskUIDs that no other job on the node holds, with no entry in the
// password database (as systemd's DynamicUser= and Nomad's dynamic workload
// users). The ranks of one job on a node share it; a task of another job
// cannot read their directories, their /proc entries or their environment
// (which holds the local API's secret).
const DynamicTaskUser = "dynamic"

// UIDRange is an inclusive range of user IDs.
type UIDRange struct {
	First, Last uint32
}

// DefaultTaskUIDs is where dynamic task users come from: a range that
// systemd leaves unused (between its container ranges and 2^31), far from
// login accounts, system users, systemd's DynamicUser= range and the
// subordinate IDs of rootless containers.
var DefaultTaskUIDs = UIDRange{First: 1_900_000_000, Last: 1_900_999_999}

// ErrUIDRange means a --task-uid-range that cannot be used.
var ErrUIDRange = errors.New("task UID range")

// ParseUIDRange reads "FIRST-LAST".
func ParseUIDRange(s string) (UIDRange, error) {
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 32)
	last, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return UIDRange{}, fmt.Errorf("%w: %q is not FIRST-LAST (two user IDs, e.g. %d-%d)", ErrUIDRange, s, DefaultTaskUIDs.First, DefaultTaskUIDs.Last)
	}
	r := UIDRange{First: uint32(first), Last: uint32(last)}
	return r, r.Validate()
}

func (r UIDRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// Validate refuses ranges that would hand a task a privileged or shared ID.
func (r UIDRange) Validate() error {
	switch {
	case r.First > r.Last:
		return fmt.Errorf("%w: %s is empty (first > last)", ErrUIDRange, r)
	case r.First < 65536:
		return fmt.Errorf("%w: %s starts below 65536, among system, login and nobody accounts; choose IDs no account uses, e.g. %s", ErrUIDRange, r, DefaultTaskUIDs)
	case r.Last >= 1<<31:
		return fmt.Errorf("%w: %s reaches 2^31, which some tools read as negative", ErrUIDRange, r)
	}
	return nil
}

// uidPool hands each job a UID of its own from a range. What is in use is
// read back from the allocation directories (each is group-owned by its
// job's ID), so an agent restart keeps every running job's account and
// gives a new job another. A job's ID is free again once its directories
// are gone (the runner removes them when the job is purged).
type uidPool struct {
	once  sync.Once
	mu    sync.Mutex
	r     UIDRange
	alloc string // <data dir>/alloc
	byJob map[string]uint32
	byUID map[uint32]string
}

func newUIDPool(dataDir string, r UIDRange) *uidPool {
	return &uidPool{r: r, alloc: filepath.Join(dataDir, "alloc")}
}

// load reads the IDs of the jobs whose directories are on disk.
func (p *uidPool) load() {
	p.byJob, p.byUID = map[string]uint32{}, map[uint32]string{}
	jobs, _ := os.ReadDir(p.alloc)
	for _, j := range jobs {
		if uid, ok := p.onDisk(j.Name()); ok {
			if _, taken := p.byUID[uid]; !taken {
				p.byJob[j.Name()], p.byUID[uid] = uid, j.Name()
			}
		}
	}
}

// onDisk is the ID that owns one of job's rank directories, if any is in
// the range.
func (p *uidPool) onDisk(job string) (uint32, bool) {
	ranks, _ := filepath.Glob(filepath.Join(p.alloc, job, "*", "*"))
	for _, d := range ranks {
		fi, err := os.Stat(d)
		if err != nil {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Gid >= p.r.First && st.Gid <= p.r.Last {
			return st.Gid, true
		}
	}
	return 0, false
}

// forJob returns job's UID, choosing one the first time: it starts at a
// hash of the job ID (so the same job gets the same ID after its
// directories are gone, and different jobs rarely probe far) and takes the
// first that no job with directories still on disk holds.
func (p *uidPool) forJob(job string) (uint32, error) {
	p.once.Do(p.load)
	p.mu.Lock()
	defer p.mu.Unlock()
	if uid, ok := p.byJob[job]; ok {
		return uid, nil
	}
	n := uint64(p.r.Last-p.r.First) + 1
	h := fnv.New64a()
	_, _ = h.Write([]byte(job))
	start := h.Sum64() % n
	for i := uint64(0); i < n; i++ {
		uid := p.r.First + uint32((start+i)%n)
		if other, taken := p.byUID[uid]; taken {
			if _, err := os.Stat(filepath.Join(p.alloc, other)); err == nil {
				continue
			}
			delete(p.byJob, other) // that job's directories are gone
		}
		p.byJob[job], p.byUID[uid] = uid, job
		return uid, nil
	}
	return 0, fmt.Errorf("%w: all %d IDs of %s are held by jobs whose directories are still on this node; widen --task-uid-range or purge ended jobs sooner (--job-gc-age)", ErrUIDRange, n, p.r)
}

// user is the TaskUser of job's dynamic account.
func (p *uidPool) user(job string) (*driver.TaskUser, error) {
	uid, err := p.forJob(job)
	if err != nil {
		return nil, err
	}
	return &driver.TaskUser{Name: "gpumesh-" + strconv.FormatUint(uint64(uid), 10), UID: uid, GID: uid}, nil
}
