package main

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/gpumesh/gpumesh/internal/tlsutil"
	"github.com/gpumesh/gpumesh/node"
)

func init() { registerCommand(newTLSCommand) }

func newTLSCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tls",
		Short: "Make the CA and the certificates for mutual TLS between agents and clients",
		Long: `Make the files that --tls-ca, --tls-cert and --tls-key take. One CA per cluster;
one certificate per node (and one for each person or tool using the CLI). Every
certificate is ECDSA P-256, valid for both ends of mutual TLS, and names
` + tlsutil.ServerName + `, 127.0.0.1 and localhost besides the node's own names and
addresses.`,
		Example: `  gpumesh tls ca create
  gpumesh tls cert create --node node-1 --ip 10.0.1.17
  gpumesh agent --tls-ca gpumesh-ca.pem --tls-cert node-1.pem --tls-key node-1-key.pem ...`,
	}
	ca := &cobra.Command{
		Use:     "ca",
		Short:   "Manage the cluster's certificate authority",
		Example: `  gpumesh tls ca create --dir /etc/gpumesh/tls`,
	}
	ca.AddCommand(newTLSCACreateCommand())
	cert := &cobra.Command{
		Use:     "cert",
		Short:   "Manage node and client certificates",
		Example: `  gpumesh tls cert create --node node-1 --ip 10.0.1.17 --dns node-1.internal`,
	}
	cert.AddCommand(newTLSCertCreateCommand())
	cmd.AddCommand(ca, cert)
	return cmd
}

func newTLSCACreateCommand() *cobra.Command {
	var dir, name string
	var days int
	var force bool
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a CA: gpumesh-ca.pem and gpumesh-ca-key.pem",
		Long: `Create a self-signed ECDSA P-256 certificate authority. Keep gpumesh-ca-key.pem
secret (it signs new members); copy gpumesh-ca.pem to every node and client.`,
		Example: `  gpumesh tls ca create
  gpumesh tls ca create --dir /etc/gpumesh/tls --days 3650`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ca, err := tlsutil.NewCA(name, time.Duration(days)*24*time.Hour)
			if err != nil {
				return err
			}
			certPath, keyPath := filepath.Join(dir, "gpumesh-ca.pem"), filepath.Join(dir, "gpumesh-ca-key.pem")
			if err := tlsutil.WriteFile(certPath, ca.CertPEM, 0o644, force); err != nil {
				return err
			}
			if err := tlsutil.WriteFile(keyPath, ca.KeyPEM, 0o600, force); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "==> wrote %s and %s (valid until %s)\n", certPath, keyPath, ca.Cert.NotAfter.Format(time.DateOnly))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", ".", "folder to write the files to")
	cmd.Flags().StringVar(&name, "name", "gpumesh CA", "the CA's common name")
	cmd.Flags().IntVar(&days, "days", 5*365, "days the CA is valid")
	cmd.Flags().BoolVar(&force, "force", false, "replace existing files")
	return cmd
}

func newTLSCertCreateCommand() *cobra.Command {
	var dir, nodeName, caFile, caKey string
	var ips, dns []string
	var days int
	var force bool
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a node's (or a client's) certificate, signed by the CA: NAME.pem and NAME-key.pem",
		Example: `  gpumesh tls cert create --node node-1 --ip 10.0.1.17
  gpumesh tls cert create --node alice            # for the CLI: --tls-cert alice.pem --tls-key alice-key.pem
  gpumesh tls cert create --node node-2 --dir /etc/gpumesh/tls \
      --ca /etc/gpumesh/tls/gpumesh-ca.pem --ca-key /etc/gpumesh/tls/gpumesh-ca-key.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ca, err := tlsutil.LoadCA(caFile, caKey)
			if errors.Is(err, fs.ErrNotExist) && !cmd.Flags().Changed("ca") {
				return fmt.Errorf("%w; for a CA made with `gpumesh tls ca create --dir DIR`, pass --ca DIR/gpumesh-ca.pem --ca-key DIR/gpumesh-ca-key.pem", err)
			}
			if err != nil {
				return err
			}
			req := tlsutil.CertRequest{Name: nodeName, DNS: dns, Validity: time.Duration(days) * 24 * time.Hour}
			for _, s := range ips {
				ip := net.ParseIP(strings.TrimSpace(s))
				if ip == nil {
					return fmt.Errorf("--ip %q is not an IP address", s)
				}
				req.IPs = append(req.IPs, ip)
			}
			certPEM, keyPEM, err := ca.Issue(req)
			if err != nil {
				return err
			}
			certPath, keyPath := filepath.Join(dir, nodeName+".pem"), filepath.Join(dir, nodeName+"-key.pem")
			if err := tlsutil.WriteFile(certPath, certPEM, 0o644, force); err != nil {
				return err
			}
			if err := tlsutil.WriteFile(keyPath, keyPEM, 0o600, force); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "==> wrote %s and %s\n    use: --tls-ca %s --tls-cert %s --tls-key %s\n", certPath, keyPath, caFile, certPath, keyPath)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&nodeName, "node", "", "the node's (or client's) name (required)")
	fl.StringSliceVar(&ips, "ip", nil, "an IP address to include (repeatable); 127.0.0.1 and ::1 are always included")
	fl.StringSliceVar(&dns, "dns", nil, "a DNS name to include (repeatable); localhost and "+tlsutil.ServerName+" are always included")
	fl.StringVar(&caFile, "ca", "gpumesh-ca.pem", "the CA certificate")
	fl.StringVar(&caKey, "ca-key", "gpumesh-ca-key.pem", "the CA key")
	fl.StringVar(&dir, "dir", ".", "folder to write the files to")
	fl.IntVar(&days, "days", 365, "days the certificate is valid (at most the CA's remaining validity)")
	fl.BoolVar(&force, "force", false, "replace existing files")
	_ = cmd.MarkFlagRequired("node")
	return cmd
}

// addSecurityFlags adds the agent's TLS and ACL flags.
func addSecurityFlags(fl *pflag.FlagSet, c *node.SecurityConfig) {
	fl.StringVar(&c.CAFile, "tls-ca", "", "CA certificate (PEM): with --tls-cert and --tls-key, gRPC and Raft use mutual TLS (make it with: gpumesh tls ca create)")
	fl.StringVar(&c.CertFile, "tls-cert", "", "this node's certificate (PEM), signed by --tls-ca (make it with: gpumesh tls cert create --node NAME)")
	fl.StringVar(&c.KeyFile, "tls-key", "", "this node's private key (PEM)")
	fl.StringVar(&c.ACLTokenFile, "acl-token-file", "", "file holding the token that job run/stop and drain (and agents' own updates) must carry")
	fl.BoolVar(&c.HTTPPlain, "http-plain", false, "keep the HTTP port (metrics, health, dashboard) in plaintext when TLS is on (default: HTTPS with the same certificate)")
	fl.StringVar(&c.HTTPAuth, "http-auth", node.HTTPAuthOpen, "who may read the HTTP port: open (reads need nothing, anything else the token) or token (every read but /v1/health needs the ACL token; open the dashboard as /#token=TOKEN)")
}

// clientTLS are the CLI's TLS settings.
type clientTLS struct {
	ca, cert, key, serverName string
}

func (t *clientTLS) addFlags(fl *pflag.FlagSet) {
	fl.StringVar(&t.ca, "tls-ca", os.Getenv("GPUMESH_TLS_CA"), "CA certificate to verify the agent with; env GPUMESH_TLS_CA (TLS is on when it is set)")
	fl.StringVar(&t.cert, "tls-cert", os.Getenv("GPUMESH_TLS_CERT"), "client certificate signed by the cluster's CA; env GPUMESH_TLS_CERT")
	fl.StringVar(&t.key, "tls-key", os.Getenv("GPUMESH_TLS_KEY"), "client certificate's key; env GPUMESH_TLS_KEY")
	fl.StringVar(&t.serverName, "tls-server-name", node.TLSServerName, "name the agent's certificate must carry")
}

// dialOption is the transport credentials the settings ask for.
func (t *clientTLS) dialOption() (grpc.DialOption, error) {
	if t.ca == "" && t.cert == "" && t.key == "" {
		return grpc.WithTransportCredentials(insecure.NewCredentials()), nil
	}
	if t.ca == "" {
		return nil, fmt.Errorf("--tls-cert and --tls-key need --tls-ca (or GPUMESH_TLS_CA)")
	}
	if (t.cert == "") != (t.key == "") {
		return nil, fmt.Errorf("--tls-cert and --tls-key go together")
	}
	cfg, _, err := node.TLSFiles(t.ca, t.cert, t.key, t.serverName)
	if err != nil {
		return nil, err
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(cfg)), nil
}

// tlsHint explains a failed TLS handshake, or returns "".
func tlsHint(msg string) string {
	switch {
	case strings.Contains(msg, "authentication handshake failed"), strings.Contains(msg, "tls:"), strings.Contains(msg, "x509:"):
		return "TLS handshake with the agent failed (" + msg + "): check --tls-ca, --tls-cert and --tls-key (or GPUMESH_TLS_*) against the cluster's CA"
	case strings.Contains(msg, "error reading server preface"), strings.Contains(msg, "connection reset"):
		return "the agent closed the connection (" + msg + "): it may require TLS; pass --tls-ca, --tls-cert and --tls-key (or GPUMESH_TLS_*)"
	}
	return ""
}
