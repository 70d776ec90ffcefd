package deploy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

// DefaultIMDSEndpoint is the instance metadata service on every EC2
// instance (IPv4).
const DefaultIMDSEndpoint = "http://169.254.169.254"

// Lifecycle is how the instance was bought.
type Lifecycle string

const (
	// LifecycleUnknown: not on EC2, or IMDS did not say.
	LifecycleUnknown Lifecycle = "unknown"
	// LifecycleSpot: a spot instance; AWS may reclaim it with a two-minute notice.
	LifecycleSpot Lifecycle = "spot"
	// LifecycleOnDemand: on-demand (also scheduled and capacity-block
	// instances, which spot interruptions do not reach).
	LifecycleOnDemand Lifecycle = "on-demand"
)

// ParseLifecycle maps IMDS's instance-life-cycle value to a Lifecycle.
func ParseLifecycle(s string) Lifecycle {
	switch strings.TrimSpace(s) {
	case "spot":
		return LifecycleSpot
	case "on-demand", "scheduled", "capacity-block":
		return LifecycleOnDemand
	default:
		return LifecycleUnknown
	}
}

// Identity is what IMDS says about this instance. Off EC2 every string is
// empty and Lifecycle is LifecycleUnknown (see UnknownIdentity).
type Identity struct {
	InstanceID       string    // e.g. "i-0123456789abcdef0"
	InstanceType     string    // e.g. "g5.xlarge"
	AvailabilityZone string    // e.g. "us-east-1a"
	Region           string    // e.g. "us-east-1"
	PrivateIP        string    // primary private IPv4 address, e.g. "10.0.1.17"
	Lifecycle        Lifecycle // spot, on-demand or unknown
}

// UnknownIdentity is the identity of a process that is not on EC2.
func UnknownIdentity() Identity { return Identity{Lifecycle: LifecycleUnknown} }

// OnEC2 reports whether the identity came from IMDS.
func (i Identity) OnEC2() bool { return i.InstanceID != "" }

// Metadata reads instance metadata items. Paths are relative to
// /latest/meta-data/ (e.g. "spot/instance-action"). A missing item is
// ErrMetadataNotFound. Implementations must be safe for concurrent use.
// *IMDS is the real one; MemMetadata is the in-memory test double.
type Metadata interface {
	Get(ctx context.Context, path string) (string, error)
}

// IMDSConfig configures the IMDSv2 client.
type IMDSConfig struct {
	// Endpoint is the base URL of the metadata service, e.g.
	// "http://127.0.0.1:1338" for ec2-metadata-mock. Default
	// DefaultIMDSEndpoint.
	Endpoint string
	// ProbeTimeout bounds the first question Identity asks (instance-id),
	// token included. No answer within it means ErrNotOnEC2. Default 1 s.
	ProbeTimeout time.Duration
	// RequestTimeout bounds every other request (token included) once the
	// service is known to answer. Default 2 s.
	RequestTimeout time.Duration
	// Disabled turns IMDS off: Identity answers ErrNotOnEC2 at once and Get
	// fails. For `gpumesh dev` and tests on a machine that may be an EC2
	// instance, where the agents must not read the real IMDS.
	Disabled bool
	// SourceAddr, if set, is the local IP address requests are sent from.
	// Agents sharing one machine on 127.0.0.x set it to their bind address,
	// so that ec2-metadata-mock's --mock-ip-count can tell them apart.
	SourceAddr string
}

// DefaultIMDSConfig returns the defaults used on EC2.
func DefaultIMDSConfig() IMDSConfig {
	return IMDSConfig{
		Endpoint:       DefaultIMDSEndpoint,
		ProbeTimeout:   time.Second,
		RequestTimeout: 2 * time.Second,
	}
}

// Validate checks the configuration.
func (c IMDSConfig) Validate() error {
	u, err := url.Parse(c.Endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%w: imds endpoint %q must be an http(s) URL such as %s", ErrInvalidConfig, c.Endpoint, DefaultIMDSEndpoint)
	}
	if c.ProbeTimeout <= 0 {
		return fmt.Errorf("%w: imds probe timeout must be > 0, got %s", ErrInvalidConfig, c.ProbeTimeout)
	}
	if c.SourceAddr != "" && net.ParseIP(c.SourceAddr) == nil {
		return fmt.Errorf("%w: imds source address %q must be an IP address", ErrInvalidConfig, c.SourceAddr)
	}
	if c.RequestTimeout <= 0 {
		return fmt.Errorf("%w: imds request timeout must be > 0, got %s", ErrInvalidConfig, c.RequestTimeout)
	}
	return nil
}

// IMDS is an IMDSv2-only client of the instance metadata service (session
// tokens; no fallback to IMDSv1). It is safe for concurrent use.
type IMDS struct {
	cfg IMDSConfig

	mu        sync.Mutex
	client    *imds.Client
	transport *http.Transport
}

var _ Metadata = (*IMDS)(nil)

// NewIMDS returns a client; it does not contact the service. Zero fields of
// cfg take their defaults.
func NewIMDS(cfg IMDSConfig) (*IMDS, error) {
	def := DefaultIMDSConfig()
	if cfg.Endpoint == "" {
		cfg.Endpoint = def.Endpoint
	}
	if cfg.ProbeTimeout == 0 {
		cfg.ProbeTimeout = def.ProbeTimeout
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = def.RequestTimeout
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m := &IMDS{cfg: cfg}
	m.client, m.transport = m.newClient()
	return m, nil
}

// Close releases idle connections. The client stays usable.
func (m *IMDS) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.transport.CloseIdleConnections()
}

// Endpoint returns the base URL the client talks to.
func (m *IMDS) Endpoint() string { return m.cfg.Endpoint }

func (m *IMDS) newClient() (*imds.Client, *http.Transport) {
	dialer := &net.Dialer{Timeout: m.cfg.RequestTimeout}
	if m.cfg.SourceAddr != "" {
		dialer.LocalAddr = &net.TCPAddr{IP: net.ParseIP(m.cfg.SourceAddr)}
	}
	transport := &http.Transport{
		Proxy:               nil, // IMDS is link-local: never through a proxy
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	client := imds.New(imds.Options{
		HTTPClient:        &http.Client{Transport: transport},
		Endpoint:          strings.TrimRight(m.cfg.Endpoint, "/"),
		ClientEnableState: imds.ClientEnabled,
		// IMDSv2 only: a missing token is an error, never a silent v1 request.
		EnableFallback: aws.FalseTernary,
		// Our own contexts bound every call.
		DisableDefaultTimeout: true,
	})
	return client, transport
}

func (m *IMDS) sdk() *imds.Client {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.client
}

// reset replaces the SDK client after a transport failure: the SDK's token
// provider disables itself for good after a failed token request, which
// would turn one network blip into permanent failure.
func (m *IMDS) reset(old *imds.Client) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.client == old {
		m.transport.CloseIdleConnections()
		m.client, m.transport = m.newClient()
	}
}

// Get reads one metadata item (path relative to /latest/meta-data/) within
// RequestTimeout. A 404 is ErrMetadataNotFound.
func (m *IMDS) Get(ctx context.Context, path string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.RequestTimeout)
	defer cancel()
	return m.get(ctx, path)
}

func (m *IMDS) get(ctx context.Context, path string) (string, error) {
	if m.cfg.Disabled {
		return "", fmt.Errorf("%w (IMDS disabled)", ErrNotOnEC2)
	}
	c := m.sdk()
	out, err := c.GetMetadata(ctx, &imds.GetMetadataInput{Path: path})
	if err != nil {
		if isHTTPStatus(err, http.StatusNotFound) {
			return "", fmt.Errorf("%w: %s", ErrMetadataNotFound, path)
		}
		m.reset(c)
		return "", fmt.Errorf("imds %s: %w", path, err)
	}
	defer out.Content.Close()
	b, err := io.ReadAll(io.LimitReader(out.Content, 1<<20))
	if err != nil {
		m.reset(c)
		return "", fmt.Errorf("imds %s: reading the answer: %w", path, err)
	}
	return strings.TrimSpace(string(b)), nil
}

func isHTTPStatus(err error, code int) bool {
	var se interface{ HTTPStatusCode() int }
	return errors.As(err, &se) && se.HTTPStatusCode() == code
}

// Identity asks IMDS who this instance is. It first asks for the instance
// ID within ProbeTimeout; no answer means the process is not on EC2, and
// Identity returns UnknownIdentity() with an error wrapping ErrNotOnEC2, so
// a caller never waits more than ProbeTimeout off EC2. Once the probe
// answers, the other items get RequestTimeout each; a missing optional item
// (placement/region on old IMDS versions) is derived or left empty, other
// failures are returned as errors together with what was learned.
func (m *IMDS) Identity(ctx context.Context) (Identity, error) {
	if m.cfg.Disabled {
		return UnknownIdentity(), fmt.Errorf("%w (IMDS disabled)", ErrNotOnEC2)
	}
	pctx, cancel := context.WithTimeout(ctx, m.cfg.ProbeTimeout)
	id, err := m.get(pctx, "instance-id")
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return UnknownIdentity(), ctx.Err()
		}
		return UnknownIdentity(), fmt.Errorf("%w (asked %s for instance-id, waited up to %s): %v",
			ErrNotOnEC2, m.cfg.Endpoint, m.cfg.ProbeTimeout, err)
	}
	ident := Identity{InstanceID: id, Lifecycle: LifecycleUnknown}
	var errs []error
	get := func(path string, dst *string, optional bool) {
		v, err := m.Get(ctx, path)
		switch {
		case err == nil:
			*dst = v
		case optional && errors.Is(err, ErrMetadataNotFound):
		default:
			errs = append(errs, err)
		}
	}
	var lifecycle string
	get("instance-type", &ident.InstanceType, false)
	get("placement/availability-zone", &ident.AvailabilityZone, false)
	get("placement/region", &ident.Region, true)
	get("local-ipv4", &ident.PrivateIP, true)
	get("instance-life-cycle", &lifecycle, true)
	ident.Lifecycle = ParseLifecycle(lifecycle)
	if ident.Region == "" {
		ident.Region = regionFromAZ(ident.AvailabilityZone)
	}
	if len(errs) > 0 {
		return ident, fmt.Errorf("imds identity of %s is incomplete: %w", id, errors.Join(errs...))
	}
	return ident, nil
}

// regionFromAZ derives the region of a standard availability zone
// ("us-east-1a" → "us-east-1"). Local and Wavelength zones are not derived.
func regionFromAZ(az string) string {
	if len(az) < 2 {
		return ""
	}
	last := az[len(az)-1]
	prev := az[len(az)-2]
	if last >= 'a' && last <= 'z' && prev >= '0' && prev <= '9' && strings.Count(az, "-") == 2 {
		return az[:len(az)-1]
	}
	return ""
}
