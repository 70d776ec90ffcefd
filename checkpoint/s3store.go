package checkpoint

//lint:file-ignore SA1019 feature/s3/manager (multipart upload, ranged parallel download) is
// deprecated in favour of feature/s3/transfermanager. Its v0.5.11 (checked 2026-12-07) is still
// pre-1.0 and copies every upload part into a pooled buffer (no io.ReaderAt path), which a
// checkpoint uploaded from its file would pay for; this file moves to it in one change with the
// bench that compares against it.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/s3/manager"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/logging"
)

// S3Config says how to reach a bucket.
type S3Config struct {
	// Bucket and Prefix come from the URI (Open fills them).
	Bucket, Prefix string
	// Region of the bucket. Default: the SDK's (AWS_REGION, the profile),
	// else us-east-1.
	Region string
	// Endpoint overrides the S3 endpoint (a VPC endpoint, an S3-compatible
	// server, a test server); with it, requests use path-style addressing.
	// Default: the region's public endpoint.
	Endpoint string
	// Credentials replace the SDK's default chain (environment, shared
	// files, the instance role through IMDS). Optional.
	Credentials aws.CredentialsProvider
	// PartSize is the multipart part size in bytes. Default 16 MiB; at
	// least 5 MiB (S3's minimum).
	PartSize int64
	// Concurrency is how many parts move at once per object. Default 8.
	Concurrency int
}

// Defaults for S3Config.
const (
	DefaultPartSize    = 16 << 20
	DefaultConcurrency = 8
)

func (c *S3Config) applyDefaults() {
	if c.PartSize == 0 {
		c.PartSize = DefaultPartSize
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
}

// Validate checks the configuration after defaults.
func (c S3Config) Validate() error {
	if c.Bucket == "" {
		return fmt.Errorf("%w: no bucket", ErrInvalidConfig)
	}
	if c.PartSize < manager.MinUploadPartSize {
		return fmt.Errorf("%w: part size %d is below S3's minimum of %d bytes", ErrInvalidConfig, c.PartSize, manager.MinUploadPartSize)
	}
	if c.Concurrency < 1 {
		return fmt.Errorf("%w: concurrency must be >= 1, got %d", ErrInvalidConfig, c.Concurrency)
	}
	if c.Endpoint != "" {
		u, err := url.Parse(c.Endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("%w: S3 endpoint %q must be an http(s) URL", ErrInvalidConfig, c.Endpoint)
		}
	}
	return nil
}

// S3Store keeps objects in an S3 bucket under a prefix. Uploads are
// multipart with concurrent parts (the SDK's transfer manager), each part
// with the CRC32 checksum the SDK adds by default and S3 verifies; downloads fetch ranges
// concurrently. S3 makes an object visible only when its upload completes,
// and an upload that fails is aborted.
type S3Store struct {
	client *s3.Client
	up     *manager.Uploader
	down   *manager.Downloader
	cfg    S3Config
}

var _ Store = (*S3Store)(nil)

// NewS3Store builds the client; it does not call S3.
func NewS3Store(ctx context.Context, cfg S3Config) (*S3Store, error) {
	cfg.applyDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	var opts []func(*config.LoadOptions) error
	if cfg.Region != "" {
		opts = append(opts, config.WithRegion(cfg.Region))
	}
	if cfg.Credentials != nil {
		opts = append(opts, config.WithCredentialsProvider(cfg.Credentials))
	}
	ac, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("aws config: %w", err)
	}
	if ac.Region == "" {
		ac.Region = "us-east-1"
	}
	// The SDK's own log lines (e.g. that a ranged response carries no
	// checksum to validate) are noise on a rank's output.
	ac.Logger = logging.Nop{}
	client := s3.NewFromConfig(ac, func(o *s3.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
			o.UsePathStyle = true
		}
	})
	return &S3Store{
		client: client,
		cfg:    cfg,
		up: manager.NewUploader(client, func(u *manager.Uploader) {
			u.PartSize, u.Concurrency = cfg.PartSize, cfg.Concurrency
		}),
		down: manager.NewDownloader(client, func(d *manager.Downloader) {
			d.PartSize, d.Concurrency = cfg.PartSize, cfg.Concurrency
		}),
	}, nil
}

func (s *S3Store) key(k string) string {
	if s.cfg.Prefix == "" {
		return k
	}
	return s.cfg.Prefix + "/" + k
}

// Upload implements Store.
func (s *S3Store) Upload(ctx context.Context, key string, r io.Reader) error {
	_, err := s.up.Upload(ctx, &s3.PutObjectInput{
		Bucket: aws.String(s.cfg.Bucket),
		Key:    aws.String(s.key(key)),
		Body:   r,
	})
	if err != nil {
		return fmt.Errorf("s3 upload %s: %w", s.key(key), err)
	}
	return nil
}

// Download implements Store.
func (s *S3Store) Download(ctx context.Context, key string, w io.WriterAt) (int64, error) {
	n, err := s.down.Download(ctx, w, &s3.GetObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.key(key))})
	if isNotFound(err) {
		return 0, fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	if err != nil {
		return n, fmt.Errorf("s3 download %s: %w", s.key(key), err)
	}
	return n, nil
}

// Size implements Store.
func (s *S3Store) Size(ctx context.Context, key string) (int64, error) {
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.key(key))})
	if isNotFound(err) {
		return 0, fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	if err != nil {
		return 0, fmt.Errorf("s3 head %s: %w", s.key(key), err)
	}
	return aws.ToInt64(out.ContentLength), nil
}

// List implements Store.
func (s *S3Store) List(ctx context.Context, prefix string) ([]string, error) {
	base := s.key("")
	p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{Bucket: aws.String(s.cfg.Bucket), Prefix: aws.String(base + prefix)})
	var keys []string
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("s3 list %s: %w", base+prefix, err)
		}
		for _, o := range page.Contents {
			keys = append(keys, strings.TrimPrefix(aws.ToString(o.Key), base))
		}
	}
	return keys, nil
}

// Delete implements Store, 1000 keys per request.
func (s *S3Store) Delete(ctx context.Context, keys ...string) error {
	for len(keys) > 0 {
		n := min(len(keys), 1000)
		objs := make([]types.ObjectIdentifier, n)
		for i, k := range keys[:n] {
			objs[i] = types.ObjectIdentifier{Key: aws.String(s.key(k))}
		}
		out, err := s.client.DeleteObjects(ctx, &s3.DeleteObjectsInput{
			Bucket: aws.String(s.cfg.Bucket),
			Delete: &types.Delete{Objects: objs, Quiet: aws.Bool(true)},
		})
		if err != nil {
			return fmt.Errorf("s3 delete: %w", err)
		}
		if len(out.Errors) > 0 {
			e := out.Errors[0]
			return fmt.Errorf("s3 delete %s: %s", aws.ToString(e.Key), aws.ToString(e.Message))
		}
		keys = keys[n:]
	}
	return nil
}

func isNotFound(err error) bool {
	if err == nil {
		return false
	}
	var nsk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nsk) || errors.As(err, &nf) {
		return true
	}
	var ae smithy.APIError
	return errors.As(err, &ae) && (ae.ErrorCode() == "NotFound" || ae.ErrorCode() == "NoSuchKey")
}
