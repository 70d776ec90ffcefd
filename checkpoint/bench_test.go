package checkpoint_test

//lint:file-ignore SA1019 feature/s3/manager (multipart upload, ranged parallel download) is
// deprecated in favour of feature/s3/transfermanager, which is still new; this file moves to it
// in one change with the bench that compares against it.

import (
	"bytes"
	"context"
	"os"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/feature/s3/manager"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/checkpoint/s3test"
)

// The checkpoint path (Checkpoints.PutPart / GetPart on an S3Store: the
// transfer manager plus a CRC32C of every byte, checked on download) against
// the AWS SDK's transfer manager alone, same server (gofakes3 in memory),
// same part size and concurrency. bench/RESULTS.md records the ratio.
const benchSize = 128 << 20

func benchClient(srv *s3test.Server) *s3.Client {
	return s3.New(s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(srv.URL),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider("test", "test", ""),
	})
}

func BenchmarkUploadCheckpoint(b *testing.B) {
	srv := s3test.NewServer(b, "bench")
	c, err := checkpoint.New(srv.Store(b, "bench", "p", 0), checkpoint.Config{})
	if err != nil {
		b.Fatal(err)
	}
	data := payload(1, benchSize)
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.PutPart(context.Background(), 1, 0, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkUploadSDKManager(b *testing.B) {
	srv := s3test.NewServer(b, "bench")
	up := manager.NewUploader(benchClient(srv), func(u *manager.Uploader) {
		u.PartSize, u.Concurrency = checkpoint.DefaultPartSize, checkpoint.DefaultConcurrency
	})
	data := payload(1, benchSize)
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_, err := up.Upload(context.Background(), &s3.PutObjectInput{Bucket: aws.String("bench"), Key: aws.String("p/x"), Body: bytes.NewReader(data)})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// committedCheckpoint is a store on a fresh test S3 server holding one
// committed checkpoint of benchSize bytes (step 1, rank 0).
func committedCheckpoint(b *testing.B) (*checkpoint.Checkpoints, checkpoint.Manifest) {
	srv := s3test.NewServer(b, "bench")
	c, err := checkpoint.New(srv.Store(b, "bench", "p", 0), checkpoint.Config{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	p, err := c.PutPart(ctx, 1, 0, bytes.NewReader(payload(1, benchSize)))
	if err != nil {
		b.Fatal(err)
	}
	m := checkpoint.Manifest{Step: 1, WorldSize: 1, Parts: []checkpoint.Part{p}}
	if err := c.Commit(ctx, m); err != nil {
		b.Fatal(err)
	}
	return c, m
}

func BenchmarkDownloadCheckpoint(b *testing.B) {
	c, m := committedCheckpoint(b)
	ctx := context.Background()
	buf := manager.NewWriteAtBuffer(make([]byte, 0, benchSize))
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := c.GetPart(ctx, m, 0, buf); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDownloadSDKManager(b *testing.B) {
	srv := s3test.NewServer(b, "bench")
	client := benchClient(srv)
	ctx := context.Background()
	up := manager.NewUploader(client)
	if _, err := up.Upload(ctx, &s3.PutObjectInput{Bucket: aws.String("bench"), Key: aws.String("p/x"), Body: bytes.NewReader(payload(1, benchSize))}); err != nil {
		b.Fatal(err)
	}
	down := manager.NewDownloader(client, func(d *manager.Downloader) {
		d.PartSize, d.Concurrency = checkpoint.DefaultPartSize, checkpoint.DefaultConcurrency
	})
	buf := manager.NewWriteAtBuffer(make([]byte, 0, benchSize))
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := down.Download(ctx, buf, &s3.GetObjectInput{Bucket: aws.String("bench"), Key: aws.String("p/x")}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUploadAgentPart is what the agent does with a rank's part of an
// S3 checkpoint: the rank has written it into a spool file
// (Checkpoints.CreatePart; not timed), and PartFile.Commit uploads it in
// parallel ranges with its checksums.
func BenchmarkUploadAgentPart(b *testing.B) {
	srv := s3test.NewServer(b, "bench")
	c, err := checkpoint.New(srv.Store(b, "bench", "p", 0), checkpoint.Config{})
	if err != nil {
		b.Fatal(err)
	}
	data := payload(1, benchSize)
	spool := b.TempDir()
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		pf, err := c.CreatePart(1, 0, spool)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := pf.File().Write(data); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := pf.Commit(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDownloadAgentPart is the agent's prefetch of an S3 part: a
// checked download into a local file (Checkpoints.OpenPart) that the rank
// then maps.
func BenchmarkDownloadAgentPart(b *testing.B) {
	c, m := committedCheckpoint(b)
	ctx := context.Background()
	dir := b.TempDir()
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f, err := c.OpenPart(ctx, m, 0, dir)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		f.Close()
		os.Remove(f.Name())
		b.StartTimer()
	}
}

// BenchmarkUploadSDKManagerFile is BenchmarkUploadAgentPart's baseline: the
// transfer manager alone uploading a file just written (not timed).
func BenchmarkUploadSDKManagerFile(b *testing.B) {
	srv := s3test.NewServer(b, "bench")
	up := manager.NewUploader(benchClient(srv), func(u *manager.Uploader) {
		u.PartSize, u.Concurrency = checkpoint.DefaultPartSize, checkpoint.DefaultConcurrency
	})
	data := payload(1, benchSize)
	dir := b.TempDir()
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		f, err := os.CreateTemp(dir, "spool")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := f.Write(data); err != nil {
			b.Fatal(err)
		}
		if _, err := f.Seek(0, 0); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := up.Upload(context.Background(), &s3.PutObjectInput{Bucket: aws.String("bench"), Key: aws.String("p/x"), Body: f}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		f.Close()
		os.Remove(f.Name())
		b.StartTimer()
	}
}

// BenchmarkDownloadSDKManagerFile is BenchmarkDownloadAgentPart's baseline:
// the transfer manager alone downloading into a new file.
func BenchmarkDownloadSDKManagerFile(b *testing.B) {
	srv := s3test.NewServer(b, "bench")
	client := benchClient(srv)
	ctx := context.Background()
	if _, err := manager.NewUploader(client).Upload(ctx, &s3.PutObjectInput{Bucket: aws.String("bench"), Key: aws.String("p/x"), Body: bytes.NewReader(payload(1, benchSize))}); err != nil {
		b.Fatal(err)
	}
	down := manager.NewDownloader(client, func(d *manager.Downloader) {
		d.PartSize, d.Concurrency = checkpoint.DefaultPartSize, checkpoint.DefaultConcurrency
	})
	dir := b.TempDir()
	b.SetBytes(benchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f, err := os.CreateTemp(dir, "copy")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := down.Download(ctx, f, &s3.GetObjectInput{Bucket: aws.String("bench"), Key: aws.String("p/x")}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		f.Close()
		os.Remove(f.Name())
		b.StartTimer()
	}
}
