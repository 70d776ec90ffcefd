package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/checkpoint/s3test"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// A job resumes only from its own checkpoints. Through one agent, with a
// directory and with S3: a job saves; the same job file submitted again
// resumes from its checkpoint; a job of another name with the same
// checkpoint.uri fails to start, at once and without restarts, with a
// status that names both jobs and what to do; `job run --resume-from`
// lets it continue from them; a manifest that names no job (written before
// names were recorded) is resumed from with a warning in job status.
func TestCheckpointOfAnotherJobFailsItsStart(t *testing.T) {
	needTorch(t)
	procs.Binary(t)
	s3 := s3test.NewServer(t, "ckpt")
	as := startAgents(t, 1, "--bootstrap-expect", "1", "--max-ranks-per-node", "4")
	addr := as[0].RPCAddr()
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for _, store := range []string{"file", "s3"} {
		t.Run(store, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			dir := t.TempDir()
			uri := "file://" + filepath.Join(dir, "store")
			if store == "s3" {
				uri = "s3://ckpt/owner"
			}
			// run submits a 1-rank training job of name through `job run
			// --detach` with flags and waits until it ends.
			run := func(name string, steps int, flags ...string) (jobJSON, string) {
				t.Helper()
				spec := map[string]any{
					"name": name, "ranks": 1, "restart": map[string]any{"attempts": 2, "delay": "1s"},
					"checkpoint": map[string]any{"uri": uri, "every": 5},
					"exec": map[string]any{
						"command": []string{torchPython, filepath.Join(wd, "testdata", "ckpt_train.py"), "--steps", strconv.Itoa(steps)},
						"env":     s3JobEnv(t, s3),
					},
				}
				sub, logs := runDetached(ctx, t, addr, dir, spec, flags...)
				var j jobJSON
				poll.Until(t, 2*time.Minute, func() error {
					if err := procs.CLIJSON(ctx, t, addr, &j, "job", "status", sub.ID); err != nil {
						return err
					}
					if s := j.Job.Status; s != "complete" && s != "failed" && s != "stopped" {
						return fmt.Errorf("job %s %s at generation %d", name, s, j.Job.Generation)
					}
					return nil
				}, "job "+name+" to end")
				return j, logs(0, j.Job.Generation)
			}
			status := func(j jobJSON) map[string]any {
				t.Helper()
				var raw map[string]any
				if err := procs.CLIJSON(ctx, t, addr, &raw, "job", "status", j.Job.ID); err != nil {
					t.Fatal(err)
				}
				return raw
			}
			complete := func(j jobJSON, logs string, from int) {
				t.Helper()
				if j.Job.Status != "complete" || j.Job.Generation != 1 {
					t.Fatalf("job %s: %s at generation %d; want complete at 1:\n%s", j.Job.ID, j.Job.Status, j.Job.Generation, tail(logs, 3000))
				}
				if got := resumedFrom(t, logs); got != from {
					t.Fatalf("job %s resumed from step %d, want %d:\n%s", j.Job.ID, got, from, tail(logs, 3000))
				}
			}

			j, logs := run("owner-a", 12)
			complete(j, logs, -1)
			// The same job file again: a resubmission continues.
			j, logs = run("owner-a", 17)
			complete(j, logs, 9)

			// Another job: refused at its start, not restarted.
			j, logs = run("owner-b", 22)
			raw := status(j)
			reason, _ := raw["job"].(map[string]any)["status_reason"].(string)
			restarts, _ := raw["job"].(map[string]any)["restarts"].(float64)
			for _, want := range []string{`written by job "owner-a"`, `this is job "owner-b"`, "resume_from: owner-a", "--resume-from owner-a", uri, "not restarted"} {
				if !strings.Contains(reason, want) {
					t.Fatalf("job %s (%s, generation %d, %v restarts): status reason does not say %q:\n%s\nrank 0:\n%s", j.Job.ID, j.Job.Status, j.Job.Generation, restarts, want, reason, tail(logs, 3000))
				}
			}
			if j.Job.Status != "failed" || j.Job.Generation != 1 || restarts != 0 {
				t.Fatalf("job %s: %s at generation %d after %v restarts; want failed at 1 without restarts: %s", j.Job.ID, j.Job.Status, j.Job.Generation, restarts, reason)
			}
			if strings.Contains(logs, "rank 0 step ") {
				t.Fatalf("the refused job trained:\n%s", tail(logs, 3000))
			}

			t.Logf("job %s: %s", j.Job.ID, reason)

			// On purpose: it continues from them.
			j, logs = run("owner-b", 22, "--resume-from", "owner-a")
			complete(j, logs, 14)

			// A manifest that names no job: resumed from, with a warning.
			var st checkpoint.Store = s3.Store(t, "ckpt", "owner", 0)
			if store == "file" {
				if st, err = checkpoint.NewFileStore(filepath.Join(dir, "store")); err != nil {
					t.Fatal(err)
				}
			}
			c, err := checkpoint.New(st, checkpoint.Config{Keep: 10})
			if err != nil {
				t.Fatal(err)
			}
			m, err := c.Latest(ctx)
			if err != nil || m.Step != 19 || m.JobName != "owner-b" {
				t.Fatalf("newest checkpoint %+v, %v: want step 19 of owner-b", m, err)
			}
			m.JobName, m.Job = "", "older-00000000"
			if err := c.Commit(ctx, m); err != nil {
				t.Fatal(err)
			}
			j, logs = run("owner-c", 22)
			complete(j, logs, 19)
			b, _ := json.Marshal(status(j)["allocations"])
			if !strings.Contains(string(b), "names no job") {
				t.Fatalf("job status has no warning about a checkpoint that names no job: %s", b)
			}
		})
	}
}

// The same check where a rank runs `gpumesh checkpoint` itself (no local
// API): commit records $GPUMESH_JOB_NAME, and latest and get refuse the
// newest checkpoint of another job unless $GPUMESH_CHECKPOINT_RESUME_FROM
// names it.
func TestCheckpointCommandsRefuseAnotherJobs(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	dir := t.TempDir()
	uri := "file://" + filepath.Join(dir, "store")
	bin := procs.Binary(t)
	commitStep(t, bin, uri, 3, "GPUMESH_JOB_NAME=train", "GPUMESH_JOB_ID=train-0000000a")
	gm := func(env []string, args ...string) (string, error) {
		cmd := exec.Command(bin, append([]string{"checkpoint", "--uri", uri}, args...)...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := gm([]string{"GPUMESH_JOB_NAME=train", "GPUMESH_JOB_ID=train-0000000b"}, "latest"); err != nil || !strings.Contains(out, `"job_name":"train"`) {
		t.Fatalf("the same job submitted again: %v\n%s", err, out)
	}
	b := []string{"GPUMESH_JOB_NAME=eval", "GPUMESH_JOB_ID=eval-0000000c"}
	for _, args := range [][]string{{"latest"}, {"get", filepath.Join(dir, "got")}} {
		if out, err := gm(b, args...); err == nil || !strings.Contains(out, `written by job "train"`) || !strings.Contains(out, "resume_from: train") {
			t.Fatalf("%s by another job: %v\n%s", args[0], err, out)
		}
	}
	if out, err := gm(append(b, "GPUMESH_CHECKPOINT_RESUME_FROM=train"), "get", filepath.Join(dir, "got")); err != nil {
		t.Fatalf("get with resume_from: %v\n%s", err, out)
	}
}
