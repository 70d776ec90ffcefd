package node

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// TLSServerName is the name every agent certificate carries (besides its
// own names and addresses) and the name agents and the CLI verify: agents
// are dialled by IP address, and any agent of the cluster may answer.
// `gpumesh tls cert create` always includes it.
const TLSServerName = "agent.gpumesh"

// Security errors.
var (
	// ErrTLSConfig means the TLS files are incomplete or unreadable.
	ErrTLSConfig = errors.New("tls config")
	// ErrACLConfig means the ACL token file is unusable.
	ErrACLConfig = errors.New("acl config")
)

// SecurityConfig is the agent's transport security and access control.
// The zero value is off: plaintext gRPC and Raft, no token checks.
type SecurityConfig struct {
	// CAFile, CertFile and KeyFile are PEM files (all three or none). With
	// them the Control API, the data plane (one gRPC port) and Raft use
	// mutual TLS: a peer must present a certificate signed by this CA, and
	// agents verify each other's certificates for TLSServerName.
	CAFile, CertFile, KeyFile string
	// ACLTokenFile holds the token (one line) that mutating calls (submit,
	// stop, drain, and the agents' own allocation and node updates) must
	// carry as "authorization: Bearer TOKEN". Every agent of a cluster uses
	// the same file.
	ACLTokenFile string
	// HTTPPlain keeps the HTTP port (metrics, health, dashboard) in
	// plaintext when TLS files are given. By default the port then serves
	// HTTPS with the same certificate; client certificates are verified
	// when presented but not required.
	HTTPPlain bool
	// HTTPAuth is who may read the HTTP port: HTTPAuthOpen (default: reads
	// are open, anything else needs the token) or HTTPAuthToken (every
	// read but /v1/health and the dashboard's files needs the token; needs
	// ACLTokenFile).
	HTTPAuth string
}

// TLSEnabled says whether TLS files are given.
func (c SecurityConfig) TLSEnabled() bool {
	return c.CAFile != "" || c.CertFile != "" || c.KeyFile != ""
}

// Validate checks that the TLS files come as a set.
func (c SecurityConfig) Validate() error {
	if c.TLSEnabled() && (c.CAFile == "" || c.CertFile == "" || c.KeyFile == "") {
		return fmt.Errorf("%w: --tls-ca, --tls-cert and --tls-key go together (got ca=%q cert=%q key=%q); make them with `gpumesh tls ca create` and `gpumesh tls cert create`",
			ErrTLSConfig, c.CAFile, c.CertFile, c.KeyFile)
	}
	switch c.HTTPAuth {
	case "", HTTPAuthOpen:
	case HTTPAuthToken:
		if c.ACLTokenFile == "" {
			return fmt.Errorf("%w: --http-auth token needs --acl-token-file (the token the HTTP port asks for)", ErrACLConfig)
		}
	default:
		return fmt.Errorf("%w: --http-auth %q: use open or token", ErrACLConfig, c.HTTPAuth)
	}
	return nil
}

// TLSFiles loads a CA, a certificate and its key and returns the client
// and server sides of mutual TLS: the server requires a client certificate
// signed by the CA; the client verifies the server for serverName
// (TLSServerName when empty) and presents its own certificate.
func TLSFiles(caFile, certFile, keyFile, serverName string) (client, server *tls.Config, err error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: CA file: %w", ErrTLSConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, nil, fmt.Errorf("%w: CA file %s holds no PEM certificate", ErrTLSConfig, caFile)
	}
	var certs []tls.Certificate
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: certificate %s / key %s: %w", ErrTLSConfig, certFile, keyFile, err)
		}
		leaf, err := x509.ParseCertificate(cert.Certificate[0])
		if err == nil && time.Now().After(leaf.NotAfter) {
			return nil, nil, fmt.Errorf("%w: certificate %s expired on %s; make a new one with `gpumesh tls cert create`", ErrTLSConfig, certFile, leaf.NotAfter.Format(time.DateOnly))
		}
		certs = []tls.Certificate{cert}
	}
	if serverName == "" {
		serverName = TLSServerName
	}
	client = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, Certificates: certs, ServerName: serverName}
	server = &tls.Config{MinVersion: tls.VersionTLS12, ClientCAs: pool, Certificates: certs, ClientAuth: tls.RequireAndVerifyClientCert}
	return client, server, nil
}

// security is an agent's loaded TLS material and ACL token.
type security struct {
	client, server *tls.Config
	token          string
	httpPlain      bool   // SecurityConfig.HTTPPlain
	httpAuthMode   string // SecurityConfig.HTTPAuth
}

// newSecurity loads what cfg names. A nil *security (no error) means off.
func newSecurity(cfg SecurityConfig, logger hclog.Logger) (*security, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &security{httpPlain: cfg.HTTPPlain, httpAuthMode: cfg.HTTPAuth}
	if cfg.TLSEnabled() {
		var err error
		if s.client, s.server, err = TLSFiles(cfg.CAFile, cfg.CertFile, cfg.KeyFile, ""); err != nil {
			return nil, err
		}
	}
	if cfg.ACLTokenFile != "" {
		b, err := os.ReadFile(cfg.ACLTokenFile)
		if err != nil {
			return nil, fmt.Errorf("%w: token file: %w", ErrACLConfig, err)
		}
		s.token = strings.TrimSpace(string(b))
		if s.token == "" {
			return nil, fmt.Errorf("%w: token file %s is empty; put one line in it (for example `openssl rand -hex 32`)", ErrACLConfig, cfg.ACLTokenFile)
		}
		if s.client == nil && logger != nil {
			logger.Warn("ACL tokens travel in plaintext without TLS; give --tls-ca, --tls-cert and --tls-key")
		}
	}
	return s, nil
}

// serverOptions are the gRPC server's credentials and ACL interceptor.
func (s *security) serverOptions() []grpc.ServerOption {
	if s == nil {
		return nil
	}
	var opts []grpc.ServerOption
	if s.server != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(s.server)))
	}
	if s.token != "" {
		opts = append(opts, grpc.ChainUnaryInterceptor(aclUnaryInterceptor(s.token)))
	}
	return opts
}

// dialOptions are what agents use to call each other (Control API
// forwarding, watch streams, the data plane): TLS when configured, and the
// agent's token on calls that do not carry a caller's.
func (s *security) dialOptions() []grpc.DialOption {
	creds := insecure.NewCredentials()
	if s != nil && s.client != nil {
		creds = credentials.NewTLS(s.client)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if s != nil && s.token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(agentToken{token: s.token, secure: s.client != nil}))
	}
	return opts
}

// raftStreamLayer is Raft's transport: TCP, with mutual TLS when
// configured (nil, nil means "use consensus's plain TCP").
func (s *security) raftStreamLayer(bind, advertise string) (raft.StreamLayer, error) {
	if s == nil || s.server == nil {
		return nil, nil
	}
	inner, err := consensus.NewTCPStreamLayer(bind, advertise)
	if err != nil {
		return nil, err
	}
	return &tlsStreamLayer{StreamLayer: inner, client: s.client, server: s.server}, nil
}

// tlsStreamLayer runs Raft over mutual TLS on top of a TCP stream layer.
type tlsStreamLayer struct {
	raft.StreamLayer
	client, server *tls.Config
}

var _ raft.StreamLayer = (*tlsStreamLayer)(nil)

// Dial connects and completes the handshake within timeout, so a peer with
// a certificate from another CA fails here, not in the middle of an RPC.
func (t *tlsStreamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	c, err := t.StreamLayer.Dial(address, timeout)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(c, t.client)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("raft tls handshake with %s: %w", address, err)
	}
	return tc, nil
}

// Accept wraps each connection; the handshake runs on its first read and
// a peer without a certificate from our CA is dropped there.
func (t *tlsStreamLayer) Accept() (net.Conn, error) {
	c, err := t.StreamLayer.Accept()
	if err != nil {
		return nil, err
	}
	return tls.Server(c, t.server), nil
}

// agentToken adds the agent's token to calls that carry none of their own
// (forwarded calls keep their caller's token and are checked with it).
type agentToken struct {
	token  string
	secure bool
}

func (t agentToken) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	if md, ok := metadata.FromOutgoingContext(ctx); ok && len(md.Get("authorization")) > 0 {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + t.token}, nil
}

func (t agentToken) RequireTransportSecurity() bool { return false }

// mutatingMethods are the calls that need the ACL token.
var mutatingMethods = map[string]string{
	pb.Control_SubmitJob_FullMethodName:         "submitting a job",
	pb.Control_StopJob_FullMethodName:           "stopping a job",
	pb.Control_DrainNode_FullMethodName:         "draining a node",
	pb.Control_NodeEligibility_FullMethodName:   "changing a node's eligibility",
	pb.Control_UpdateAllocations_FullMethodName: "reporting allocation status",
	pb.Control_RegisterNode_FullMethodName:      "registering a node",
	pb.Control_ReportLoad_FullMethodName:        "reporting service load",
}

// aclUnaryInterceptor refuses mutating calls without the right token:
// Unauthenticated when none is given, PermissionDenied when it is wrong.
func aclUnaryInterceptor(token string) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if what, ok := mutatingMethods[info.FullMethod]; ok {
			if err := checkToken(ctx, token, what); err != nil {
				return nil, err
			}
		}
		return handler(ctx, req)
	}
}

func checkToken(ctx context.Context, token, what string) error {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return status.Errorf(codes.Unauthenticated, "this cluster requires an ACL token for %s: pass --token or set GPUMESH_TOKEN", what)
	}
	for _, v := range vals {
		got, ok := strings.CutPrefix(v, "Bearer ")
		if !ok {
			got = v
		}
		if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(token)) == 1 {
			return nil
		}
	}
	return status.Errorf(codes.PermissionDenied, "the ACL token given is not valid for this cluster, so %s was refused: check --token or GPUMESH_TOKEN", what)
}
