package collective

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

const helperEnv = "GPUMESH_COLLECTIVE_TEST_RANK"

// TestMain's helper mode: this test binary, re-executed with helperEnv set,
// is one rank of a group (see TestKilledProcessFailsSurvivors).
func init() {
	if os.Getenv(helperEnv) == "" {
		return
	}
	os.Exit(helperRank())
}

func helperRank() int {
	s, err := Listen("127.0.0.1:0", DefaultNetConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(s.Addr())
	var addrs []string
	if err := json.NewDecoder(bufio.NewReader(os.Stdin)).Decode(&addrs); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cfg := testConfig()
	c, err := New(s.Transport(), Group{Job: "proc", Generation: 1, Rank: 1, Addrs: addrs}, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	buf := NewHostBuffer(Float32, 1<<20)
	for {
		if err := c.AllReduce(context.Background(), buf, OpSum); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
}

// A rank's process is killed with SIGKILL in the middle of the ring: both
// surviving ranks (in this process) return an error promptly, and no
// goroutine is left behind (goleak in TestMain).
func TestKilledProcessFailsSurvivors(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a process")
	}
	cfg := testConfig()
	cfg.Timeout = 5 * time.Second
	srvs := listenServers(t, 2, DefaultNetConfig())
	s0, s2 := srvs[0], srvs[1]
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	addrs := []string{s0.Addr(), strings.TrimSpace(line), s2.Addr()}
	if err := json.NewEncoder(stdin).Encode(addrs); err != nil {
		t.Fatal(err)
	}
	comms := make([]*Communicator, 2)
	for i, s := range []*Server{s0, s2} {
		if comms[i], err = New(s.Transport(), Group{Job: "proc", Generation: 1, Rank: 2 * i, Addrs: addrs}, cfg); err != nil {
			t.Fatal(err)
		}
	}
	defer CloseAll(comms)
	var done atomic.Int64
	errc := make(chan error, 2)
	for _, c := range comms {
		go func() {
			buf := NewHostBuffer(Float32, 1<<20)
			for {
				if err := c.AllReduce(context.Background(), buf, OpSum); err != nil {
					errc <- err
					return
				}
				done.Add(1)
			}
		}()
	}
	poll.Until(t, 10*time.Second, func() bool { return done.Load() >= 6 })
	killed := time.Now()
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		select {
		case err := <-errc:
			if !errors.Is(err, ErrPeerFailed) && !errors.Is(err, ErrTimeout) {
				t.Fatalf("survivor error: %v", err)
			}
		case <-time.After(cfg.Timeout + 10*time.Second):
			t.Fatal("a survivor did not return after its peer was killed")
		}
	}
	t.Logf("survivors failed %v after the kill", time.Since(killed))
}
