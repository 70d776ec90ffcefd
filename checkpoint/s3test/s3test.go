// Package s3test runs a real S3-compatible server (gofakes3, in memory)
// inside a test process, and builds checkpoint stores that talk to it
// through the AWS SDK, so tests exercise the SDK's multipart, checksum and
// ranged-download paths against a server that checks them.
package s3test

import (
	"context"
	"net/http/httptest"
	"testing"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"

	"github.com/gpumesh/gpumesh/checkpoint"
)

// Server is an in-memory S3 server on a loopback port.
type Server struct {
	// URL is the endpoint to give S3Config.Endpoint.
	URL     string
	Backend *s3mem.Backend
	srv     *httptest.Server
}

// NewServer starts a server with the given buckets; it stops when the test
// ends.
func NewServer(tb testing.TB, buckets ...string) *Server {
	tb.Helper()
	be := s3mem.New()
	fake := gofakes3.New(be, gofakes3.WithIntegrityCheck(true))
	srv := httptest.NewServer(fake.Server())
	tb.Cleanup(srv.Close)
	for _, b := range buckets {
		if err := be.CreateBucket(b); err != nil {
			tb.Fatalf("create bucket %s: %v", b, err)
		}
	}
	return &Server{URL: srv.URL, Backend: be, srv: srv}
}

// Config returns an S3Config for a bucket and prefix on this server, with
// static test credentials and the given part size (0: the default).
func (s *Server) Config(bucket, prefix string, partSize int64) checkpoint.S3Config {
	return checkpoint.S3Config{
		Bucket:      bucket,
		Prefix:      prefix,
		Region:      "us-east-1",
		Endpoint:    s.URL,
		Credentials: credentials.NewStaticCredentialsProvider("test", "test", ""),
		PartSize:    partSize,
	}
}

// Store returns an S3Store on this server.
func (s *Server) Store(tb testing.TB, bucket, prefix string, partSize int64) *checkpoint.S3Store {
	tb.Helper()
	st, err := checkpoint.NewS3Store(context.Background(), s.Config(bucket, prefix, partSize))
	if err != nil {
		tb.Fatal(err)
	}
	return st
}
