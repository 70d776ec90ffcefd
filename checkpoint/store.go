package checkpoint

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"path"
	"strings"
)

// Store holds whole objects under keys made of '/'-separated names.
// Implementations are safe for concurrent use.
type Store interface {
	// Upload stores r's bytes under key, replacing what was there. The
	// object is visible whole once Upload returns nil and never in part; on
	// error nothing new is visible.
	Upload(ctx context.Context, key string, r io.Reader) error
	// Download writes the object's bytes into w from offset 0 and returns
	// their count; ErrNotFound if there is none. Writes may come in any
	// order and concurrently.
	Download(ctx context.Context, key string, w io.WriterAt) (int64, error)
	// Size returns the object's size, or ErrNotFound.
	Size(ctx context.Context, key string) (int64, error)
	// List returns the keys that start with prefix, in lexical order.
	List(ctx context.Context, prefix string) ([]string, error)
	// Delete removes the objects; a key that does not exist is not an error.
	Delete(ctx context.Context, keys ...string) error
}

// URI is a parsed checkpoint location.
type URI struct {
	// Scheme is "s3" or "file".
	Scheme string
	// Bucket is the S3 bucket (s3 only).
	Bucket string
	// Prefix is the key prefix inside the bucket without leading or trailing
	// '/' (s3), or the absolute directory (file).
	Prefix string
}

// String gives the URI back in its canonical form.
func (u URI) String() string {
	if u.Scheme == "s3" {
		if u.Prefix == "" {
			return "s3://" + u.Bucket
		}
		return "s3://" + u.Bucket + "/" + u.Prefix
	}
	return "file://" + u.Prefix
}

// ParseURI reads s3://bucket/prefix or file:///absolute/dir.
func ParseURI(s string) (URI, error) {
	u, err := url.Parse(s)
	if err != nil {
		return URI{}, fmt.Errorf("%w: %q: %v; use s3://bucket/prefix or file:///absolute/dir", ErrInvalidURI, s, err)
	}
	switch u.Scheme {
	case "s3":
		if u.Host == "" {
			return URI{}, fmt.Errorf("%w: %q names no bucket; use s3://bucket/prefix", ErrInvalidURI, s)
		}
		p := strings.Trim(u.Path, "/")
		if strings.Contains(p, "//") {
			return URI{}, fmt.Errorf("%w: %q has an empty path element", ErrInvalidURI, s)
		}
		return URI{Scheme: "s3", Bucket: u.Host, Prefix: p}, nil
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return URI{}, fmt.Errorf("%w: %q names host %q; a file URI is file:///absolute/dir (three slashes)", ErrInvalidURI, s, u.Host)
		}
		if !path.IsAbs(u.Path) || path.Clean(u.Path) == "/" {
			return URI{}, fmt.Errorf("%w: %q needs an absolute directory other than /, e.g. file:///shared/ckpt", ErrInvalidURI, s)
		}
		return URI{Scheme: "file", Prefix: path.Clean(u.Path)}, nil
	default:
		return URI{}, fmt.Errorf("%w: %q: unknown scheme %q; use s3://bucket/prefix or file:///absolute/dir", ErrInvalidURI, s, u.Scheme)
	}
}

// Open returns the Store for a URI: an S3Store for s3://, a FileStore for
// file://. cfg configures S3 and is ignored for files.
func Open(ctx context.Context, uri string, cfg S3Config) (Store, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	if u.Scheme == "file" {
		return NewFileStore(u.Prefix)
	}
	cfg.Bucket, cfg.Prefix = u.Bucket, u.Prefix
	return NewS3Store(ctx, cfg)
}
