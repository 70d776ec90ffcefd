package deploy

import (
	"context"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"

	"github.com/gpumesh/gpumesh/deploy/ec2fake"
)

// newFakeEC2 starts the EC2 Query fake on loopback and returns an SDK
// client pointed at it with static credentials; nothing reaches AWS.
func newFakeEC2(t testing.TB) (*ec2fake.Server, *ec2.Client) {
	t.Helper()
	return newFakeEC2With(t, nil)
}

func newFakeEC2With(t testing.TB, hc aws.HTTPClient) (*ec2fake.Server, *ec2.Client) {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_CA_BUNDLE", "")
	fake := ec2fake.New()
	url := fakeURL(t, fake)
	c, err := NewEC2Client(context.Background(), AWSConfig{
		Region:      "us-east-1",
		Endpoint:    url,
		Credentials: credentials.NewStaticCredentialsProvider("AKIDTEST", "SECRETTEST", ""),
		HTTPClient:  hc,
	})
	if err != nil {
		t.Fatal(err)
	}
	return fake, c
}

// fakeURL serves fake on loopback for the rest of the test.
func fakeURL(t testing.TB, fake *ec2fake.Server) string {
	srv := httptest.NewServer(fake)
	t.Cleanup(srv.Close)
	return srv.URL
}
