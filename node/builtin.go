package node

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/driver"
)

// builtinTask is a rank that runs inside the agent (the allreduce and
// pipeline drivers): a goroutine with its own context and a log file in its
// allocation directory.
type builtinTask struct {
	cancel  context.CancelFunc
	done    chan struct{}
	logPath string

	mu     sync.Mutex
	result taskResult
}

func (t *builtinTask) Done() <-chan struct{} { return t.done }

func (t *builtinTask) Result() taskResult {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.result
}

func (t *builtinTask) Stop(reason string, deadline time.Time) { t.cancel() }

// builtinBody is the work of a built-in rank. It logs to logger (which
// writes the rank's log file) and returns its report.
type builtinBody func(ctx context.Context, logger hclog.Logger) (map[string]any, error)

// builtinLogName is a built-in rank's log file in its allocation directory.
const builtinLogName = "builtin.log"

// startBuiltin runs body as the rank of al.
func startBuiltin(r *runner, al *pb.Allocation, body builtinBody) (task, error) {
	dir := driver.AllocDir(mustAbs(r.a.cfg.DataDir), taskID(al))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, builtinLogName)
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(r.ctx)
	t := &builtinTask{cancel: cancel, done: make(chan struct{}), logPath: logPath}
	logger := hclog.New(&hclog.LoggerOptions{
		Name:   fmt.Sprintf("%s/gen%d/rank%d", al.JobId, al.Generation, al.Rank),
		Output: io.MultiWriter(f),
		Level:  hclog.Info,
	})
	go func() {
		defer close(t.done)
		defer f.Close()
		defer cancel()
		report, err := body(ctx, logger)
		res := taskResult{Report: report}
		if err != nil {
			res.Failed, res.ExitCode, res.Message = true, 1, err.Error()
			logger.Error("rank failed", "error", err)
		} else {
			logger.Info("rank complete")
		}
		t.mu.Lock()
		t.result = res
		t.mu.Unlock()
	}()
	return t, nil
}

// openBuiltinLogs opens the log of a built-in rank at offset, if there is
// one. Built-in ranks write one stream, whose lines carry their time; stderr
// reads as empty.
func openBuiltinLogs(r *runner, id driver.TaskID, stream string, offset int64) (logStream, bool) {
	dir := driver.AllocDir(mustAbs(r.a.cfg.DataDir), id)
	p := filepath.Join(dir, builtinLogName)
	f, err := os.Open(p)
	if err != nil {
		return nil, false
	}
	if stream == "stderr" {
		f.Close()
		return &fileLogs{}, true
	}
	if offset > 0 {
		if offset, err = f.Seek(offset, io.SeekStart); err != nil {
			f.Close()
			return nil, false
		}
	}
	return &fileLogs{f: f, off: offset}, true
}
