package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node/driver"
)

// gpumesh runs the real binary and fails the test on error.
func gpumesh(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, procs.Binary(t), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("gpumesh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestTLSAndTokenEndToEnd makes a CA and certificates with the CLI, runs
// three agents as processes with mutual TLS and an ACL token, and uses the
// CLI against them with and without the right settings.
func TestTLSAndTokenEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	dir := t.TempDir()
	pki := filepath.Join(dir, "tls")
	out := gpumesh(t, "tls", "ca", "create", "--dir", pki)
	if !strings.Contains(out, "gpumesh-ca.pem") {
		t.Fatalf("ca create: %s", out)
	}
	ca, caKey := filepath.Join(pki, "gpumesh-ca.pem"), filepath.Join(pki, "gpumesh-ca-key.pem")
	if _, err := exec.Command(procs.Binary(t), "tls", "ca", "create", "--dir", pki).CombinedOutput(); err == nil {
		t.Fatal("ca create overwrote an existing CA without --force")
	}
	names := []string{"agent-1", "agent-2", "agent-3", "alice"}
	for i, n := range names {
		gpumesh(t, "tls", "cert", "create", "--node", n, "--ip", fmt.Sprintf("127.0.0.%d", i+2), "--ca", ca, "--ca-key", caKey, "--dir", pki)
	}
	token := filepath.Join(dir, "token")
	if err := os.WriteFile(token, []byte("let-me-in\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "agents")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = driver.KillAll(ctx, data)
	})
	var as []*procs.Agent
	for i := 0; i < 3; i++ {
		n := names[i]
		as = append(as, procs.NewAgent(t, data, n, fmt.Sprintf("127.0.0.%d", i+2), "--bootstrap-expect", "3",
			"--tls-ca", ca, "--tls-cert", filepath.Join(pki, n+".pem"), "--tls-key", filepath.Join(pki, n+"-key.pem"),
			"--acl-token-file", token))
	}
	for i, a := range as {
		for j, b := range as {
			if i != j {
				a.Args = append(a.Args, "--join", b.GossipAddr())
			}
		}
		a.Start()
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 3000))
			}
		}
	})
	tlsArgs := []string{"--tls-ca", ca, "--tls-cert", filepath.Join(pki, "alice.pem"), "--tls-key", filepath.Join(pki, "alice-key.pem")}
	addr := as[1].RPCAddr()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	poll.Until(t, 60*time.Second, func() error {
		out, stderr, err := procs.CLI(ctx, t, addr, append([]string{"nodes"}, tlsArgs...)...)
		if err != nil {
			return fmt.Errorf("%v: %s", err, stderr)
		}
		if strings.Count(out, "ready") != 3 || !strings.Contains(out, "leader") {
			return fmt.Errorf("nodes:\n%s", out)
		}
		return nil
	})

	// Without TLS settings the CLI cannot talk to the cluster, and says why.
	_, stderr, err := procs.CLI(ctx, t, addr, "nodes", "--timeout", "5s")
	if err == nil || !strings.Contains(stderr, "TLS") {
		t.Fatalf("plaintext CLI against a TLS cluster: err %v, stderr %q (want a TLS hint)", err, stderr)
	}

	spec := filepath.Join(dir, "hello.yaml")
	if err := os.WriteFile(spec, []byte("name: hello\ntype: exec\nranks: 2\nexec:\n  command: [\"sh\", \"-c\", \"echo rank $RANK\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, err = procs.CLI(ctx, t, addr, append([]string{"job", "run", spec}, tlsArgs...)...)
	if err == nil || !strings.Contains(stderr, "requires an ACL token") || !strings.Contains(stderr, "--token") {
		t.Fatalf("job run without a token: err %v, stderr %q", err, stderr)
	}
	_, stderr, err = procs.CLI(ctx, t, addr, append([]string{"job", "run", spec, "--token", "wrong"}, tlsArgs...)...)
	if err == nil || !strings.Contains(stderr, "not valid") {
		t.Fatalf("job run with a wrong token: err %v, stderr %q", err, stderr)
	}
	out, stderr, err = procs.CLI(ctx, t, addr, append([]string{"job", "run", spec, "--token", "let-me-in"}, tlsArgs...)...)
	if err != nil {
		t.Fatalf("job run with the token: %v\n%s%s", err, out, stderr)
	}
	if !strings.Contains(out, "submitted") {
		t.Fatalf("job run output:\n%s", out)
	}
}

// A CA made in a folder of its own (`tls ca create --dir DIR`, as the
// example does) is not found by `tls cert create` without --ca: it says
// which flags name it; with them, the certificate is made.
func TestTLSCertCreateNamesTheCAFlags(t *testing.T) {
	dir := t.TempDir()
	if _, err := runCLI(t, "tls", "ca", "create", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	_, err := runCLI(t, "tls", "cert", "create", "--node", "node-1", "--dir", dir)
	if err == nil || !strings.Contains(err.Error(), "--ca DIR/gpumesh-ca.pem --ca-key DIR/gpumesh-ca-key.pem") {
		t.Fatalf("cert without --ca beside a CA in %s: %v", dir, err)
	}
	if _, err := runCLI(t, "tls", "cert", "create", "--node", "node-1", "--dir", dir,
		"--ca", filepath.Join(dir, "gpumesh-ca.pem"), "--ca-key", filepath.Join(dir, "gpumesh-ca-key.pem")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "node-1.pem")); err != nil {
		t.Fatal(err)
	}
}
