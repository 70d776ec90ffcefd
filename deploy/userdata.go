package deploy

import (
	"bytes"
	_ "embed"
	"fmt"
	"net/url"
	"regexp"
	"slices"
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
	// CheckAgentArgs, when set, checks AgentArgs against the agent's own
	// flags (cmd/gpumesh passes its parser), so that a typo fails the
	// render instead of crash-looping every instance.
	CheckAgentArgs func(args []string) error
	// TaskUser is the account tasks run as (--task-user); user-data creates
	// it when the AMI lacks it. "dynamic" gives every job an account of its
	// own (node.DynamicTaskUser). Default DefaultTaskUser.
	TaskUser string
	// SecretsFrom is where Secrets live: SecretsSSM (default) or
	// SecretsManager.
	SecretsFrom string
	// Secrets names the boot secrets; user-data fetches them with the
	// instance role into /etc/gpumesh/secrets (0600) and points the agent at
	// them. Their values never appear in the user-data.
	Secrets BootSecrets
}

// DefaultTaskUser is what tasks run as: an account of each job's own, so
// that one job cannot read another's files, processes or secrets.
const DefaultTaskUser = "dynamic"

// Where boot secrets are kept.
const (
	SecretsSSM     = "ssm"
	SecretsManager = "secretsmanager"
)

// BootSecrets are names (SSM parameter names such as /gpumesh/prod/tls-key,
// or Secrets Manager secret names or ARNs) of the agent's secrets. Empty
// names are not fetched.
type BootSecrets struct {
	// TLSCA, TLSCert and TLSKey are the PEM files of mutual TLS (all three or
	// none): --tls-ca, --tls-cert, --tls-key.
	TLSCA, TLSCert, TLSKey string
	// ACLToken is the token mutating calls must carry (--acl-token-file).
	ACLToken string
	// GossipKey is the base64 gossip encryption key (--encrypt-file).
	GossipKey string
}

func (b BootSecrets) names() []string {
	return []string{b.TLSCA, b.TLSCert, b.TLSKey, b.ACLToken, b.GossipKey}
}

// rendererFlags are set by the renderer itself; secretFlags come from
// Secrets, never inline.
var (
	rendererFlags = []string{"--data-dir", "--join-ec2-tag", "--task-user"}
	secretFlags   = []string{"--encrypt", "--encrypt-file", "--tls-ca", "--tls-cert", "--tls-key", "--acl-token-file"}
)

var secretNameRe = regexp.MustCompile(`^[A-Za-z0-9/_+=.@:-]{1,1000}$`)
var userNameRe = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

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
	if c.BinarySHA256 != "" && c.CUDABinarySHA256 == "" && c.CUDA != CUDAOff {
		return bad("--binary-sha256 pins the default build but the CUDA build would be installed unchecked: give --cuda-binary-sha256 too (or --cuda off)")
	}
	if c.CUDABinarySHA256 != "" && c.BinarySHA256 == "" && c.CUDA != CUDAOn {
		return bad("--cuda-binary-sha256 pins the CUDA build but the default build would be installed unchecked: give --binary-sha256 too (or --cuda on)")
	}
	if c.TaskUser != "" && !userNameRe.MatchString(c.TaskUser) {
		return bad("task user %q is not a user name (lowercase letters, digits, _ and -)", c.TaskUser)
	}
	switch c.SecretsFrom {
	case "", SecretsSSM, SecretsManager:
	default:
		return bad("secrets source %q must be ssm or secretsmanager", c.SecretsFrom)
	}
	for _, n := range c.Secrets.names() {
		if n != "" && !secretNameRe.MatchString(n) {
			return bad("secret name %q must be an SSM parameter or Secrets Manager name (letters, digits and / _ + = . @ : -)", n)
		}
	}
	if tls := c.Secrets.TLSCA + c.Secrets.TLSCert + c.Secrets.TLSKey; tls != "" &&
		(c.Secrets.TLSCA == "" || c.Secrets.TLSCert == "" || c.Secrets.TLSKey == "") {
		return bad("the TLS secrets go together: give --tls-ca-secret, --tls-cert-secret and --tls-key-secret")
	}
	for _, a := range c.AgentArgs {
		if !shellSafe(a) || !strings.HasPrefix(a, "-") {
			return bad("agent argument %q must be one flag like --bootstrap-expect=3 (letters, digits and + - = . _ : / @ only)", a)
		}
		name, _, _ := strings.Cut(a, "=")
		if slices.Contains(rendererFlags, name) {
			return bad("agent argument %q: user-data sets %s itself", a, name)
		}
		if slices.Contains(secretFlags, name) {
			return bad("agent argument %q: secrets do not go into user-data (anyone who can describe the instance reads it); name them with --tls-ca-secret, --tls-cert-secret, --tls-key-secret, --acl-token-secret and --gossip-key-secret", a)
		}
	}
	if c.CheckAgentArgs != nil && len(c.AgentArgs) > 0 {
		if err := c.CheckAgentArgs(c.AgentArgs); err != nil {
			return bad("agent arguments %v: %v; every instance would fail to start the agent (see gpumesh agent --help)", c.AgentArgs, err)
		}
	}
	return nil
}

// AgentArgs returns the flags the unit starts `gpumesh agent` with.
func (c UserDataConfig) agentArgs() []string {
	args := []string{"--data-dir=" + DataDir, "--join-ec2-tag=" + c.Tag.String(), "--task-user=" + c.TaskUser}
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
	if c.TaskUser == "" {
		c.TaskUser = DefaultTaskUser
	}
	if c.SecretsFrom == "" {
		c.SecretsFrom = SecretsSSM
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
		"Region":           c.Region,
		"TaskUser":         c.TaskUser,
		"SecretsFrom":      c.SecretsFrom,
		"Secrets":          c.Secrets,
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
