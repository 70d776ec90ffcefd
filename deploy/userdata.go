package deploy

import (
	"bytes"
	_ "embed"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"text/template"
)

// SystemdUnit is the agent's systemd unit (deploy/gpumesh.service).
//
//go:embed gpumesh.service
var SystemdUnit string

//go:embed userdata.sh.tmpl
var userDataTemplate string

var userDataTmpl = template.Must(template.New("user-data").Parse(userDataTemplate))

// DataDir is where the agent keeps its state on EC2 (systemd's
// StateDirectory=gpumesh).
const DataDir = "/var/lib/gpumesh"

// CUDAMode chooses the build user-data installs.
type CUDAMode string

const (
	// CUDAAuto installs the CUDA build where the instance has an NVIDIA GPU
	// (PCI vendor 0x10de, or a GPU instance family) and the driver
	// (libcuda.so.1); the default build elsewhere.
	CUDAAuto CUDAMode = "auto"
	// CUDAOn always installs the CUDA build.
	CUDAOn CUDAMode = "on"
	// CUDAOff always installs the default build.
	CUDAOff CUDAMode = "off"
)

// nvidiaFamilies are EC2 instance families with NVIDIA GPUs (g4ad has AMD
// GPUs and is left out). The boot script also checks the PCI bus.
var nvidiaFamilies = []string{
	"p2", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200", "p6e-gb200",
	"g3", "g3s", "g4dn", "g5", "g5g", "g6", "g6e", "g6f", "gr6", "gr6f", "g7e",
}

// InstanceTypeHasNVIDIAGPU reports whether an instance type (e.g.
// "g5.xlarge") belongs to a family with NVIDIA GPUs.
func InstanceTypeHasNVIDIAGPU(instanceType string) bool {
	family, _, _ := strings.Cut(instanceType, ".")
	for _, f := range nvidiaFamilies {
		if family == f {
			return true
		}
	}
	return false
}

// UserDataConfig configures the boot script.
type UserDataConfig struct {
	// Tag is the join tag the agent discovers its peers by.
	Tag Tag
	// Region for the EC2 API. Empty: the agent takes the instance's region.
	Region string
	// BinaryURL is where the default build is downloaded from; "{arch}" is
	// replaced by amd64 or arm64 at boot. Empty: the AMI already has
	// /usr/local/bin/gpumesh.
	BinaryURL string
	// CUDABinaryURL is the CUDA build. Default: BinaryURL + "-cuda".
	CUDABinaryURL string
	// BinarySHA256 and CUDABinarySHA256 optionally pin the downloads.
	BinarySHA256, CUDABinarySHA256 string
	// CUDA chooses the build. Default CUDAAuto.
	CUDA CUDAMode
	// AgentArgs are extra flags for `gpumesh agent` (each one word, e.g.
	// "--bootstrap-expect=3").
	AgentArgs []string
}

var sha256Re = regexp.MustCompile(`^[0-9a-f]{64}$`)

// Validate checks the configuration.
func (c UserDataConfig) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: user-data: "+format, append([]any{ErrInvalidConfig}, a...)...)
	}
	if err := c.Tag.Validate(); err != nil {
		return err
	}
	if !shellSafe(c.Tag.String()) {
		return bad("tag %q must be letters, digits and + - = . _ : / @ only (no spaces) to be passed to the agent", c.Tag)
	}
	if c.Region != "" && !shellSafe(c.Region) {
		return bad("region %q is not a region name like us-east-1", c.Region)
	}
	for _, u := range []string{c.BinaryURL, c.CUDABinaryURL} {
		if u == "" {
			continue
		}
		pu, err := url.Parse(strings.ReplaceAll(u, "{arch}", "amd64"))
		if err != nil || (pu.Scheme != "https" && pu.Scheme != "http" && pu.Scheme != "s3") || pu.Host == "" ||
			strings.ContainsAny(u, "'\n\r\\`$\" ") {
			return bad("binary URL %q must be an http(s) URL without quotes, spaces or $", u)
		}
		if pu.Scheme == "s3" {
			return bad("binary URL %q: s3:// is not supported; use a presigned or public https URL", u)
		}
	}
	if c.CUDABinaryURL != "" && c.BinaryURL == "" {
		return bad("a CUDA binary URL needs --binary-url for the default build too")
	}
	for _, s := range []string{c.BinarySHA256, c.CUDABinarySHA256} {
		if s != "" && !sha256Re.MatchString(s) {
			return bad("checksum %q is not a lowercase hex SHA-256", s)
		}
	}
	switch c.CUDA {
	case "", CUDAAuto, CUDAOn, CUDAOff:
	default:
		return bad("cuda mode %q must be auto, on or off", c.CUDA)
	}
	for _, a := range c.AgentArgs {
		if !shellSafe(a) || !strings.HasPrefix(a, "-") {
			return bad("agent argument %q must be one flag like --bootstrap-expect=3 (letters, digits and + - = . _ : / @ only)", a)
		}
	}
	return nil
}

// AgentArgs returns the flags the unit starts `gpumesh agent` with.
func (c UserDataConfig) agentArgs() []string {
	args := []string{"--data-dir=" + DataDir, "--join-ec2-tag=" + c.Tag.String()}
	if c.Region != "" {
		args = append(args, "--region="+c.Region)
	}
	return append(args, c.AgentArgs...)
}

// RenderUserData returns the cloud-init user-data (a bash script) that
// installs gpumesh, writes SystemdUnit and /etc/gpumesh/gpumesh.env, and
// starts the agent with --join-ec2-tag.
func RenderUserData(c UserDataConfig) (string, error) {
	if c.CUDA == "" {
		c.CUDA = CUDAAuto
	}
	if err := c.Validate(); err != nil {
		return "", err
	}
	if c.CUDABinaryURL == "" && c.BinaryURL != "" {
		c.CUDABinaryURL = c.BinaryURL + "-cuda"
	}
	unit := SystemdUnit
	if !strings.HasSuffix(unit, "\n") {
		unit += "\n"
	}
	var b bytes.Buffer
	err := userDataTmpl.Execute(&b, map[string]any{
		"Tag":              c.Tag.String(),
		"BinaryURL":        c.BinaryURL,
		"BinarySHA256":     c.BinarySHA256,
		"CUDABinaryURL":    c.CUDABinaryURL,
		"CUDABinarySHA256": c.CUDABinarySHA256,
		"CUDA":             string(c.CUDA),
		"GPUFamilies":      strings.Join(nvidiaFamilies, " "),
		"AgentArgs":        strings.Join(c.agentArgs(), " "),
		"Unit":             unit,
	})
	if err != nil {
		return "", fmt.Errorf("rendering user-data: %w", err)
	}
	if b.Len() > 16*1024 {
		return "", fmt.Errorf("%w: user-data is %d bytes; EC2 allows 16 KiB", ErrInvalidConfig, b.Len())
	}
	return b.String(), nil
}
