package deploy

import (
	"context"
	"fmt"
	"net/url"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/smithy-go/logging"
	"github.com/hashicorp/go-hclog"
)

// AWSConfig says how to reach the EC2 API.
type AWSConfig struct {
	// Region, e.g. "us-east-1". Required (on EC2, take Identity.Region).
	Region string
	// Endpoint overrides the EC2 API endpoint (a VPC endpoint, or a test
	// server). Empty: the region's public endpoint.
	Endpoint string
	// Profile selects a shared-config profile. Empty: the default chain.
	Profile string
	// Credentials, if set, replace the SDK's default credential chain
	// (environment, shared files, the instance role through IMDS).
	Credentials aws.CredentialsProvider
	// HTTPClient replaces the SDK's HTTP client. Optional.
	HTTPClient aws.HTTPClient
	// Logger receives the SDK's own log lines (warnings about retries and
	// connections). Default: a null logger.
	Logger hclog.Logger
}

// Validate checks the configuration.
func (c AWSConfig) Validate() error {
	if c.Region == "" {
		return fmt.Errorf("%w: the EC2 region is empty; pass --region (on EC2 it defaults to the instance's region)", ErrInvalidConfig)
	}
	if c.Endpoint != "" {
		u, err := url.Parse(c.Endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("%w: EC2 endpoint %q must be an http(s) URL", ErrInvalidConfig, c.Endpoint)
		}
	}
	return nil
}

// NewEC2Client loads the SDK configuration (credentials from the default
// chain unless c.Credentials is set) and returns an EC2 API client. It
// does not call AWS.
func NewEC2Client(ctx context.Context, c AWSConfig) (*ec2.Client, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	opts := []func(*config.LoadOptions) error{config.WithRegion(c.Region)}
	if c.Profile != "" {
		opts = append(opts, config.WithSharedConfigProfile(c.Profile))
	}
	if c.Credentials != nil {
		opts = append(opts, config.WithCredentialsProvider(c.Credentials))
	}
	lg := c.Logger
	if lg == nil {
		lg = hclog.NewNullLogger()
	}
	lg = lg.Named("aws-sdk")
	opts = append(opts, config.WithLogger(logging.LoggerFunc(func(cl logging.Classification, format string, v ...any) {
		if cl == logging.Warn {
			lg.Warn(fmt.Sprintf(format, v...))
		} else {
			lg.Debug(fmt.Sprintf(format, v...))
		}
	})))
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("loading AWS configuration: %w", err)
	}
	return ec2.NewFromConfig(cfg, func(o *ec2.Options) {
		if c.Endpoint != "" {
			o.BaseEndpoint = aws.String(c.Endpoint)
		}
		if c.HTTPClient != nil {
			o.HTTPClient = c.HTTPClient
		}
	}), nil
}
