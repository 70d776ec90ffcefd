package collbench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func smallConfig() Config {
	cfg := DefaultConfig()
	cfg.Sizes = []int64{4 << 10, 256 << 10}
	cfg.Iters, cfg.Warmup = 2, 1
	cfg.Collective.Channels = 2
	cfg.Collective.ChunkBytes = 64 << 10
	return cfg
}

func TestRunInProcessTable(t *testing.T) {
	cfg := smallConfig()
	cfg.Ranks = 3
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Rows) != 2 || res.Wrong != 0 {
		t.Fatalf("%+v", res)
	}
	for _, r := range res.Rows {
		if r.BusBWGBps <= 0 || r.RawBusGBps <= 0 || r.Ratio <= 0 {
			t.Fatalf("row %+v", r)
		}
	}
	var b bytes.Buffer
	WriteTable(&b, res)
	if !strings.Contains(b.String(), "busbw") || !strings.Contains(b.String(), "262144") {
		t.Fatalf("table:\n%s", b.String())
	}
}

// Ranks of one process share one server when asked (and by default for
// devices other than cpu): the result says so and is still exact; a bad
// mode is refused.
func TestRunInProcessShortcut(t *testing.T) {
	cfg := smallConfig()
	cfg.RawTCP = false
	cfg.Shortcut = ShortcutOn
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Shortcut || res.Wrong != 0 || len(res.Rows) != 2 {
		t.Fatalf("%+v", res)
	}
	var b bytes.Buffer
	WriteTable(&b, res)
	if !strings.Contains(b.String(), "in-memory shortcut") {
		t.Fatalf("table:\n%s", b.String())
	}
	for _, c := range []struct {
		mode, device string
		want         bool
	}{{"", "cpu", false}, {ShortcutAuto, "cuda", true}, {ShortcutOff, "cuda", false}, {ShortcutOn, "cpu", true}} {
		cfg.Shortcut, cfg.Device = c.mode, c.device
		if got := cfg.shared(); got != c.want {
			t.Errorf("shortcut %q device %s: shared %v, want %v", c.mode, c.device, got, c.want)
		}
	}
	cfg.Shortcut, cfg.Device = "sometimes", "cpu"
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "shortcut") {
		t.Fatalf("Validate: %v", err)
	}
	if ch, chunk, ok := DeviceDefaults("cuda", true); !ok || ch < 1 || chunk < 1 {
		t.Fatalf("cuda defaults %d %d %v", ch, chunk, ok)
	}
	if _, _, ok := DeviceDefaults("cpu", true); ok {
		t.Fatal("cpu has device defaults")
	}
}

func TestCudaWithoutBackendIsClear(t *testing.T) {
	cfg := smallConfig()
	cfg.Device = "cuda"
	if _, err := Run(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "-tags cuda") {
		t.Fatalf("got %v", err)
	}
}

// The worker protocol of --procs, with goroutines standing in for processes.
func TestWorkerProtocol(t *testing.T) {
	cfg := smallConfig()
	wc := WorkerConfig{Collective: cfg.Collective, Net: cfg.Net, Spec: cfg.jobSpec()}
	type pipes struct {
		inW  *io.PipeWriter
		outR *bufio.Reader
		done chan error
	}
	ws := make([]pipes, 2)
	for i := range ws {
		inR, inW := io.Pipe()
		outR, outW := io.Pipe()
		ws[i] = pipes{inW: inW, outR: bufio.NewReader(outR), done: make(chan error, 1)}
		go func() {
			err := RunWorker(context.Background(), inR, outW, wc, nil)
			_ = outW.CloseWithError(io.EOF)
			ws[i].done <- err
		}()
	}
	addrs := make([]string, 2)
	for i, w := range ws {
		var h workerHello
		if err := readJSON(w.outR, &h); err != nil {
			t.Fatal(err)
		}
		addrs[i] = h.Addr
	}
	for i, w := range ws {
		if err := json.NewEncoder(w.inW).Encode(workerStart{Rank: i, Addrs: addrs}); err != nil {
			t.Fatal(err)
		}
	}
	for i, w := range ws {
		var d workerDone
		if err := readJSON(w.outR, &d); err != nil {
			t.Fatal(err)
		}
		if d.Error != "" || d.Report.Rank != i || len(d.Report.Results) != 2 || d.Report.Wrong != 0 {
			t.Fatalf("worker %d: %+v", i, d)
		}
	}
	for _, w := range ws {
		if err := <-w.done; err != nil {
			t.Fatal(err)
		}
		_ = w.inW.Close()
	}
}

// Several rounds are reported as medians, the ratio as the median of the
// rounds' own ratios with their range, and every wrong element counts.
func TestCombineRounds(t *testing.T) {
	mk := func(bus, raw float64, wrong int64) *Result {
		row := Row{RawBusGBps: raw, Ratio: bus / raw}
		row.BusBWGBps, row.AlgBWGBps, row.TimeUs, row.Wrong = bus, bus, 1/bus, wrong
		return &Result{Ranks: 2, Rows: []Row{row}, Wrong: wrong}
	}
	got := combine([]*Result{mk(1, 4, 0), mk(3, 3, 2), mk(2, 4, 1)})
	r := got.Rows[0]
	if r.BusBWGBps != 2 || r.RawBusGBps != 4 || r.Rounds != 3 || r.Wrong != 3 || got.Wrong != 3 {
		t.Fatalf("combined row %+v, wrong %d", r, got.Wrong)
	}
	if r.Ratio != 0.5 || r.RatioMin != 0.25 || r.RatioMax != 1 {
		t.Fatalf("ratio %v in [%v, %v], want the median 0.5 in [0.25, 1]", r.Ratio, r.RatioMin, r.RatioMax)
	}
	if one := mk(1, 2, 0); combine([]*Result{one}) != one {
		t.Fatal("one round is reported as it is")
	}
}
