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
		"EnvironmentFile=-/etc/gpumesh/gpumesh.env", "Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID", "KillMode=process", "WantedBy=multi-user.target"} {
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
		// The CUDA build would be installed unchecked next to a pinned default.
		"cuda build unpinned": {Tag: ok.Tag, BinaryURL: "https://x/y", BinarySHA256: strings.Repeat("a", 64)},
		"default unpinned":    {Tag: ok.Tag, BinaryURL: "https://x/y", CUDABinarySHA256: strings.Repeat("a", 64)},
		"inline gossip key":   {Tag: ok.Tag, AgentArgs: []string{"--encrypt=c2VjcmV0"}},
		"inline token file":   {Tag: ok.Tag, AgentArgs: []string{"--acl-token-file=/x"}},
		"data dir overridden": {Tag: ok.Tag, AgentArgs: []string{"--data-dir=/x"}},
		"tls secrets partial": {Tag: ok.Tag, Secrets: BootSecrets{TLSCA: "/gpumesh/prod/ca"}},
		"secret name":         {Tag: ok.Tag, Secrets: BootSecrets{ACLToken: "a b"}},
		"secrets source":      {Tag: ok.Tag, SecretsFrom: "vault"},
		"task user":           {Tag: ok.Tag, TaskUser: "Root;x"},
		// An agent flag that does not exist would crash-loop every instance.
		"unknown agent flag": {Tag: ok.Tag, AgentArgs: []string{"--bootstrap-expct=3"},
			CheckAgentArgs: func(a []string) error { return errors.New("unknown flag: --bootstrap-expct") }},
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
	wantArgs := `GPUMESH_AGENT_ARGS="--data-dir=/var/lib/gpumesh --join-ec2-tag=gpumesh:cluster=prod --task-user=dynamic --region=us-west-2 --bootstrap-expect=3"`
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
	out, err := e.run(t, UserDataConfig{Tag: tag, BinaryURL: e.url, BinarySHA256: strings.Repeat("0", 64), CUDA: CUDAOff})
	if err == nil || !strings.Contains(out, "checksum") {
		t.Fatalf("bad checksum: err %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(e.root, "usr/local/bin/gpumesh")); !os.IsNotExist(err) {
		t.Fatal("a binary with a wrong checksum was installed")
	}
	// The right checksum installs.
	sum := sha256.Sum256([]byte("default-build"))
	out, err = e.run(t, UserDataConfig{Tag: tag, BinaryURL: e.url, BinarySHA256: hex.EncodeToString(sum[:]), CUDA: CUDAOff})
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

func TestUserDataChecksAgentArgs(t *testing.T) {
	var got []string
	c := UserDataConfig{Tag: Tag{"k", "v"}, AgentArgs: []string{"--bootstrap-expect=3"},
		CheckAgentArgs: func(a []string) error { got = a; return nil }}
	if _, err := RenderUserData(c); err != nil || len(got) != 1 || got[0] != "--bootstrap-expect=3" {
		t.Fatalf("checker saw %v, err %v", got, err)
	}
}

// Both builds pinned: the CUDA build is checked too, and a wrong sum fails.
func TestUserDataChecksCUDABuild(t *testing.T) {
	if runtime.GOARCH != "amd64" && runtime.GOARCH != "arm64" {
		t.Skip("needs an amd64 or arm64 host")
	}
	e := newBootEnv(t, "g5.xlarge")
	e.addDriver(t)
	good := sha256.Sum256([]byte("default-build"))
	c := UserDataConfig{Tag: Tag{"k", "v"}, BinaryURL: e.url, BinarySHA256: hex.EncodeToString(good[:]),
		CUDABinarySHA256: strings.Repeat("0", 64)}
	out, err := e.run(t, c)
	if err == nil || !strings.Contains(out, "checksum") {
		t.Fatalf("a CUDA build with the wrong checksum: err %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(e.root, "usr/local/bin/gpumesh")); !os.IsNotExist(err) {
		t.Fatal("a CUDA build with a wrong checksum was installed")
	}
	cuda := sha256.Sum256([]byte("cuda-build"))
	c.CUDABinarySHA256 = hex.EncodeToString(cuda[:])
	if out, err := e.run(t, c); err != nil || e.installed(t) != "cuda-build" {
		t.Fatalf("right checksums: %v\n%s", err, out)
	}
}

// Secrets are fetched by name with the aws CLI (a stand-in here) into
// 0600 files the agent is pointed at; their values are not in the script.
func TestUserDataFetchesSecrets(t *testing.T) {
	e := newBootEnv(t, "m5.large")
	awsLog := filepath.Join(t.TempDir(), "aws.log")
	// The stand-in prints "value-of-NAME" for --name/--secret-id NAME and
	// fails for names containing "missing", as the CLI does.
	fake := `#!/bin/bash
echo "$@" >> ` + awsLog + `
name=""
while [ $# -gt 0 ]; do case "$1" in --name|--secret-id) name="$2"; shift ;; esac; shift; done
case "$name" in *missing*) echo "An error occurred (ParameterNotFound)" >&2; exit 254 ;; esac
echo "value-of-$name"
`
	if err := os.WriteFile(filepath.Join(e.bin, "aws"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	sec := BootSecrets{TLSCA: "/gpumesh/prod/ca", TLSCert: "/gpumesh/prod/cert", TLSKey: "/gpumesh/prod/key",
		ACLToken: "/gpumesh/prod/token", GossipKey: "/gpumesh/prod/gossip"}
	c := UserDataConfig{Tag: Tag{"gpumesh:cluster", "prod"}, Region: "eu-west-1", BinaryURL: e.url, Secrets: sec}
	script, err := RenderUserData(c)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(script, "value-of") {
		t.Fatal("a secret's value is in the user-data")
	}
	out, err := e.run(t, c)
	if err != nil {
		t.Fatalf("user-data failed: %v\n%s", err, out)
	}
	for file, name := range map[string]string{"tls-ca.pem": sec.TLSCA, "tls-cert.pem": sec.TLSCert, "tls-key.pem": sec.TLSKey,
		"acl-token": sec.ACLToken, "gossip-key": sec.GossipKey} {
		p := filepath.Join(e.root, "etc/gpumesh/secrets", file)
		b, err := os.ReadFile(p)
		if err != nil || string(b) != "value-of-"+name+"\n" {
			t.Errorf("%s: %q %v", file, b, err)
		}
		if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", file, st.Mode().Perm())
		}
	}
	env, _ := os.ReadFile(filepath.Join(e.root, "etc/gpumesh/gpumesh.env"))
	for _, want := range []string{"--tls-ca=/etc/gpumesh/secrets/tls-ca.pem", "--tls-key=/etc/gpumesh/secrets/tls-key.pem",
		"--acl-token-file=/etc/gpumesh/secrets/acl-token", "--encrypt-file=/etc/gpumesh/secrets/gossip-key"} {
		if !strings.Contains(string(env), want) {
			t.Errorf("env file lacks %s:\n%s", want, env)
		}
	}
	calls, _ := os.ReadFile(awsLog)
	if !strings.Contains(string(calls), "ssm get-parameter --region eu-west-1 --with-decryption --name /gpumesh/prod/key") {
		t.Errorf("aws calls:\n%s", calls)
	}
	// A secret that cannot be fetched stops the boot before the agent starts.
	os.Remove(filepath.Join(e.root, "etc/systemd/system/gpumesh.service"))
	c.Secrets.ACLToken = "/gpumesh/prod/missing"
	c.SecretsFrom = SecretsManager
	out, err = e.run(t, c)
	if err == nil || !strings.Contains(out, "fetching secret /gpumesh/prod/missing from secretsmanager failed") {
		t.Fatalf("missing secret: err %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(e.root, "etc/systemd/system/gpumesh.service")); !os.IsNotExist(err) {
		t.Fatal("the agent was installed without its secrets")
	}
}

// The ldconfig fallback finds the driver under pipefail even when ldconfig
// has much more to print after the match (grep -q would stop reading and
// ldconfig would die of SIGPIPE, failing the pipeline).
func TestUserDataLdconfigFallbackUnderPipefail(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("bash not installed")
	}
	script, err := RenderUserData(UserDataConfig{Tag: Tag{"k", "v"}})
	if err != nil {
		t.Fatal(err)
	}
	fn := regexp.MustCompile(`(?s)has_nvidia_driver\(\) \{.*?\n\}`).FindString(script)
	if fn == "" {
		t.Fatal("has_nvidia_driver not found in the script")
	}
	// Only the fallback may find it: the library paths point nowhere.
	fn = strings.ReplaceAll(fn, `"$ROOT"/usr/lib`, `/nonexistent/usr/lib`)
	bin := t.TempDir()
	ldconfig := "#!/bin/bash\necho '\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1'\n" +
		"for i in $(seq 1 20000); do echo \"\tlibfoo$i.so (libc6,x86-64) => /usr/lib/libfoo$i.so\"; done\n"
	if err := os.WriteFile(filepath.Join(bin, "ldconfig"), []byte(ldconfig), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", "-c", "set -euo pipefail\nROOT=''\n"+fn+"\nif has_nvidia_driver; then echo found; else echo missing; fi")
	cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "found" {
		t.Fatalf("driver through ldconfig: %v %q", err, out)
	}
}

// shellcheck finds nothing in the rendered script, with every option used.
func TestUserDataShellcheck(t *testing.T) {
	sc, err := exec.LookPath("shellcheck")
	if err != nil {
		t.Skip("shellcheck not installed (apt-get install shellcheck); the rendered script is not linted here")
	}
	script, err := RenderUserData(UserDataConfig{Tag: Tag{"gpumesh:cluster", "prod"}, Region: "us-east-1",
		BinaryURL: "https://example.com/gpumesh-{arch}", BinarySHA256: strings.Repeat("a", 64), CUDABinarySHA256: strings.Repeat("b", 64),
		AgentArgs: []string{"--bootstrap-expect=3"},
		Secrets:   BootSecrets{TLSCA: "/gpumesh/prod/ca", TLSCert: "/gpumesh/prod/cert", TLSKey: "/gpumesh/prod/key", ACLToken: "/gpumesh/prod/token", GossipKey: "/gpumesh/prod/gossip"}})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sc, "-s", "bash", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("shellcheck: %v\n%s", err, out)
	}
}
