package node

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/hashicorp/go-hclog"
)

// syncBuffer is a bytes.Buffer safe for the logger's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// A clean shutdown (what SIGTERM does) of a follower that the leader is
// heartbeating logs no ERROR.
func TestCleanShutdownLogsNoError(t *testing.T) {
	var buf syncBuffer
	dc := startCluster(t, 3, func(i int, c *Config) {
		if i == 1 {
			c.Logger = hclog.New(&hclog.LoggerOptions{Name: c.NodeName, Level: hclog.Debug, Output: &buf})
		}
	})
	a := dc.Agents[1]
	// Wait until the leader's heartbeats reach it over an open connection.
	poll.Until(t, 20*time.Second, func() error {
		if a.IsLeader() {
			t.Skip("the logged node leads; this checks a follower")
		}
		if id, _ := a.raft.Leader(); id == "" {
			return errors.New("no leader known yet")
		}
		return nil
	})
	mark := len(buf.String())
	if err := a.Shutdown(); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(buf.String()[mark:], "\n") {
		if strings.Contains(line, "[ERROR]") {
			t.Errorf("clean shutdown logged: %s", line)
		}
	}
}
