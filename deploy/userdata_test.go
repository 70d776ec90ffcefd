package deploy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

func TestInstanceTypeHasNVIDIAGPU(t *testing.T) {
	for typ, want := range map[string]bool{"g5.xlarge": true, "p4d.24xlarge": true, "g4dn.xlarge": true,
		"g5g.xlarge": true, "p6-b200.48xlarge": true, "g4ad.xlarge": false, "m5.large": false, "c7gn.large": false, "": false} {
		if got := InstanceTypeHasNVIDIAGPU(typ); got != want {
			t.Errorf("InstanceTypeHasNVIDIAGPU(%q) = %v, want %v", typ, got, want)
		}
	}
}

func TestSystemdUnit(t *testing.T) {
	for _, want := range []string{"Restart=always", "LimitNOFILE=", "LimitMEMLOCK=infinity", "StateDirectory=gpumesh",
		"WorkingDirectory=/var/lib/gpumesh", "ExecStart=/usr/local/bin/gpumesh agent $GPUMESH_AGENT_ARGS",
		"EnvironmentFile=-/etc/gpumesh/gpumesh.env", "KillMode=process", "WantedBy=multi-user.target"} {
		if !strings.Contains(SystemdUnit, want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed; the unit's syntax is not verified here")
	}
	// Verify the unit's syntax with the binary path swapped for one that exists.
	dir := t.TempDir()
	unit := strings.Replace(SystemdUnit, "/usr/local/bin/gpumesh", "/bin/true", 1)
	p := filepath.Join(dir, "gpumesh.service")
	if err := os.WriteFile(p, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", p).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// The sandbox: exposure at most 5.0 ("OK"), as systemd scores it.
	out, err = exec.Command(sa, "security", "--offline=true", "--no-pager", p).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "Overall exposure level") {
		t.Skipf("this systemd-analyze cannot score a unit file offline (needs systemd 250): %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for gpumesh.service: ([0-9.]+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	if score, _ := strconv.ParseFloat(m[1], 64); score > 5.0 {
		t.Fatalf("systemd-analyze security exposure %.1f > 5.0:\n%s", score, out)
	}
	for _, cap := range []string{"CAP_SETUID", "CAP_SETGID", "CAP_KILL"} {
		if !strings.Contains(SystemdUnit, cap) {
			t.Errorf("the sandbox drops %s, which starting and stopping tasks as --task-user needs", cap)
		}
	}
	for _, dev := range []string{"char-nvidia-frontend rw", "char-nvidia-uvm rw"} {
		if !strings.Contains(SystemdUnit, "DeviceAllow="+dev) {
			t.Errorf("the sandbox does not allow the GPU devices (%s)", dev)
		}
	}
}

func TestUserDataValidate(t *testing.T) {
	ok := UserDataConfig{Tag: Tag{"gpumesh:cluster", "prod"}}
	if _, err := RenderUserData(ok); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]UserDataConfig{
		"space in tag":    {Tag: Tag{"k", "my cluster"}},
		"quote in url":    {Tag: ok.Tag, BinaryURL: "https://x/'a"},
		"dollar in url":   {Tag: ok.Tag, BinaryURL: "https://x/$HOME"},
		"not a url":       {Tag: ok.Tag, BinaryURL: "gpumesh"},
		"s3 url":          {Tag: ok.Tag, BinaryURL: "s3://bucket/gpumesh"},
		"cuda url alone":  {Tag: ok.Tag, CUDABinaryURL: "https://x/y"},
		"bad sha":         {Tag: ok.Tag, BinaryURL: "https://x/y", BinarySHA256: "abc"},
		"bad mode":        {Tag: ok.Tag, CUDA: "maybe"},
		"arg not a flag":  {Tag: ok.Tag, AgentArgs: []string{"rm"}},
		"arg with space":  {Tag: ok.Tag, AgentArgs: []string{"--a=b c"}},
		"arg with subst":  {Tag: ok.Tag, AgentArgs: []string{"--a=$(reboot)"}},
		"region injected": {Tag: ok.Tag, Region: "us-east-1;reboot"},
	} {
		if _, err := RenderUserData(c); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: err = %v, want ErrInvalidConfig", name, err)
		}
	}
}

// bootEnv runs the rendered user-data with bash against a fake root: the
// binary server is an httptest server, IMDS is the real ec2-metadata-mock,
// /sys is a fake PCI tree, and systemctl is a script that records its
// arguments.
type bootEnv struct {
	root, sysfs, bin, imds, url string
	systemctlLog                string
}

func newBootEnv(t *testing.T, instanceType string) *bootEnv {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("user-data runs on Linux")
	}
	for _, tool := range []string{"bash", "curl", "sha256sum"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	dir := t.TempDir()
	e := &bootEnv{root: filepath.Join(dir, "root"), sysfs: filepath.Join(dir, "sys"), bin: filepath.Join(dir, "bin"),
		systemctlLog: filepath.Join(dir, "systemctl.log")}
	for _, d := range []string{e.root, e.bin, filepath.Join(e.sysfs, "bus/pci/devices/0000:00:00.0")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// An Intel host bridge is always there.
	os.WriteFile(filepath.Join(e.sysfs, "bus/pci/devices/0000:00:00.0/vendor"), []byte("0x8086\n"), 0o644)
	os.WriteFile(filepath.Join(e.bin, "systemctl"), []byte("#!/bin/sh\necho \"$@\" >> "+e.systemctlLog+"\n"), 0o755)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/gpumesh-amd64", "/gpumesh-arm64":
			w.Write([]byte("default-build"))
		case "/gpumesh-amd64-cuda", "/gpumesh-arm64-cuda":
			w.Write([]byte("cuda-build"))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	e.url = srv.URL + "/gpumesh-{arch}"
	e.imds = startAEMM(t, aemmOptions{values: map[string]string{"instance-type": instanceType}})
	return e
}

func (e *bootEnv) addNVIDIAGPU(t *testing.T) {
	d := filepath.Join(e.sysfs, "bus/pci/devices/0000:00:1e.0")
	os.MkdirAll(d, 0o755)
	if err := os.WriteFile(filepath.Join(d, "vendor"), []byte("0x10de\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (e *bootEnv) addDriver(t *testing.T) {
	d := filepath.Join(e.root, "usr/lib/x86_64-linux-gnu")
	os.MkdirAll(d, 0o755)
	if err := os.WriteFile(filepath.Join(d, "libcuda.so.1"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

func (e *bootEnv) run(t *testing.T, c UserDataConfig) (string, error) {
	t.Helper()
	script, err := RenderUserData(c)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", "-c", script)
	cmd.Env = append(os.Environ(), "GPUMESH_ROOT="+e.root, "GPUMESH_SYSFS="+e.sysfs, "GPUMESH_IMDS_ENDPOINT="+e.imds,
		"PATH="+e.bin+":"+os.Getenv("PATH"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	return out.String(), err
}

func (e *bootEnv) installed(t *testing.T) string {
	t.Helper()
	p := filepath.Join(e.root, "usr/local/bin/gpumesh")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o755 {
		t.Fatalf("binary mode %v, want 0755", st.Mode().Perm())
	}
	return string(b)
}

func TestUserDataInstallsAndStarts(t *testing.T) {
	if runtime.GOARCH != "amd64" && runtime.GOARCH != "arm64" {
		t.Skip("needs an amd64 or arm64 host")
	}
	e := newBootEnv(t, "g5.xlarge")
	e.addDriver(t)
	c := UserDataConfig{Tag: Tag{"gpumesh:cluster", "prod"}, Region: "us-west-2", BinaryURL: e.url,
		AgentArgs: []string{"--bootstrap-expect=3"}}
	out, err := e.run(t, c)
	if err != nil {
		t.Fatalf("user-data failed: %v\n%s", err, out)
	}
	if got := e.installed(t); got != "cuda-build" {
		t.Fatalf("installed %q on a g5 with a driver, want the CUDA build\n%s", got, out)
	}
	unit, _ := os.ReadFile(filepath.Join(e.root, "etc/systemd/system/gpumesh.service"))
	if string(unit) != SystemdUnit {
		t.Fatalf("unit written differs from deploy/gpumesh.service:\n%s", unit)
	}
	env, _ := os.ReadFile(filepath.Join(e.root, "etc/gpumesh/gpumesh.env"))
	wantArgs := `GPUMESH_AGENT_ARGS="--data-dir=/var/lib/gpumesh --join-ec2-tag=gpumesh:cluster=prod --region=us-west-2 --bootstrap-expect=3"`
	if !strings.Contains(string(env), wantArgs) || !strings.Contains(string(env), "GPUMESH_BUILD=cuda") {
		t.Fatalf("env file:\n%s\nwant %s", env, wantArgs)
	}
	if st, err := os.Stat(filepath.Join(e.root, "var/lib/gpumesh")); err != nil || !st.IsDir() {
		t.Fatal("data dir not created")
	}
	calls, _ := os.ReadFile(e.systemctlLog)
	if string(calls) != "daemon-reload\nenable --now gpumesh.service\n" {
		t.Fatalf("systemctl calls:\n%s", calls)
	}
}

func TestUserDataPicksBuild(t *testing.T) {
	if runtime.GOARCH != "amd64" && runtime.GOARCH != "arm64" {
		t.Skip("needs an amd64 or arm64 host")
	}
	tag := Tag{"gpumesh:cluster", "prod"}
	cases := []struct {
		name         string
		instanceType string
		pciGPU       bool
		driver       bool
		mode         CUDAMode
		want         string
		wantLog      string
	}{
		{"cpu instance", "m5.large", false, false, CUDAAuto, "default-build", "installing the default build"},
		{"gpu family without driver", "g6.xlarge", false, false, CUDAAuto, "default-build", "no driver"},
		{"gpu on the pci bus", "x9.unknown", true, true, CUDAAuto, "cuda-build", "installing the cuda build"},
		{"forced off", "p4d.24xlarge", true, true, CUDAOff, "default-build", "installing the default build"},
		{"forced on", "m5.large", false, false, CUDAOn, "cuda-build", "installing the cuda build"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newBootEnv(t, c.instanceType)
			if c.pciGPU {
				e.addNVIDIAGPU(t)
			}
			if c.driver {
				e.addDriver(t)
			}
			out, err := e.run(t, UserDataConfig{Tag: tag, BinaryURL: e.url, CUDA: c.mode})
			if err != nil {
				t.Fatalf("user-data failed: %v\n%s", err, out)
			}
			if got := e.installed(t); got != c.want {
				t.Fatalf("installed %q, want %q\n%s", got, c.want, out)
			}
			if !strings.Contains(out, c.wantLog) {
				t.Fatalf("output lacks %q:\n%s", c.wantLog, out)
			}
		})
	}
}

func TestUserDataFailures(t *testing.T) {
	e := newBootEnv(t, "m5.large")
	tag := Tag{"k", "v"}
	// Wrong checksum: the script fails and installs nothing.
	out, err := e.run(t, UserDataConfig{Tag: tag, BinaryURL: e.url, BinarySHA256: strings.Repeat("0", 64)})
	if err == nil || !strings.Contains(out, "checksum") {
		t.Fatalf("bad checksum: err %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(e.root, "usr/local/bin/gpumesh")); !os.IsNotExist(err) {
		t.Fatal("a binary with a wrong checksum was installed")
	}
	// The right checksum installs.
	sum := sha256.Sum256([]byte("default-build"))
	out, err = e.run(t, UserDataConfig{Tag: tag, BinaryURL: e.url, BinarySHA256: hex.EncodeToString(sum[:])})
	if err != nil {
		t.Fatalf("right checksum: %v\n%s", err, out)
	}
	if got := e.installed(t); got != "default-build" {
		t.Fatalf("installed %q", got)
	}
	os.Remove(filepath.Join(e.root, "usr/local/bin/gpumesh"))
	// No URL and no binary in the AMI.
	out, err = e.run(t, UserDataConfig{Tag: tag})
	if err == nil || !strings.Contains(out, "not in the AMI") {
		t.Fatalf("no binary: err %v\n%s", err, out)
	}
	// 404 on download.
	out, err = e.run(t, UserDataConfig{Tag: tag, BinaryURL: strings.Replace(e.url, "gpumesh-", "missing-", 1)})
	if err == nil || !strings.Contains(out, "downloading") {
		t.Fatalf("404: err %v\n%s", err, out)
	}
}
