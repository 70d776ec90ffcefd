package tlsutil

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestIssueVerifiesForEveryName(t *testing.T) {
	ca, err := NewCA("", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue(CertRequest{Name: "node-1", IPs: []net.IP{net.ParseIP("10.0.1.17")}, DNS: []string{"n1.internal"}})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := pem.Decode(keyPEM); b == nil || b.Type != "EC PRIVATE KEY" {
		t.Fatal("key is not an EC PEM key")
	}
	b, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	for _, name := range []string{"node-1", ServerName, "localhost", "n1.internal", "127.0.0.1", "10.0.1.17", "::1"} {
		for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: name, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
				t.Errorf("verify for %s (usage %v): %v", name, usage, err)
			}
		}
	}
	if cert.NotAfter.After(ca.Cert.NotAfter) {
		t.Errorf("certificate outlives its CA: %s > %s", cert.NotAfter, ca.Cert.NotAfter)
	}
	other, _ := NewCA("other", time.Hour)
	foreign := x509.NewCertPool()
	foreign.AddCert(other.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: foreign, DNSName: "node-1"}); err == nil {
		t.Error("a certificate verified against another CA")
	}
	if _, _, err := ca.Issue(CertRequest{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("issue without a name: %v", err)
	}
}

func TestWriteAndLoadCA(t *testing.T) {
	dir := t.TempDir()
	ca, err := NewCA("x", 0)
	if err != nil {
		t.Fatal(err)
	}
	cf, kf := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "sub", "ca-key.pem")
	if err := WriteFile(cf, ca.CertPEM, 0o644, false); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(kf, ca.KeyPEM, 0o600, false); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(cf, ca.CertPEM, 0o644, false); !errors.Is(err, ErrExists) {
		t.Fatalf("overwrite without force: %v", err)
	}
	if fi, _ := os.Stat(kf); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", fi.Mode())
	}
	back, err := LoadCA(cf, kf)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Cert.Equal(ca.Cert) || !back.Key.Equal(ca.Key) {
		t.Fatal("loaded CA differs")
	}
	if _, err := LoadCA(kf, kf); err == nil {
		t.Fatal("a key file loaded as a CA certificate")
	}
}
