package deploy

import (
	"context"
	"fmt"
	"sort"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// Discoverer returns the addresses of peers to join.
type Discoverer interface {
	// Addrs returns peer IP addresses (no ports). Safe for concurrent use.
	Addrs(ctx context.Context) ([]string, error)
}

// TagDiscoverer finds peers through EC2 DescribeInstances: the private IPv4
// addresses of running instances that carry a tag, as Consul's and Nomad's
// cloud auto-join do. It is stateless and safe for concurrent use; the
// caller retries until it has joined.
type TagDiscoverer struct {
	api      ec2.DescribeInstancesAPIClient
	tag      Tag
	pageSize int32
}

var _ Discoverer = (*TagDiscoverer)(nil)

// TagDiscoveryConfig configures a TagDiscoverer.
type TagDiscoveryConfig struct {
	// Tag is the join tag: instances with tag Key=Value are peers.
	Tag Tag
	// PageSize is DescribeInstances' MaxResults (5..1000). Default 1000.
	PageSize int32
}

// NewTagDiscoverer returns a discoverer that asks api (an *ec2.Client from
// NewEC2Client) for instances with cfg.Tag.
func NewTagDiscoverer(api ec2.DescribeInstancesAPIClient, cfg TagDiscoveryConfig) (*TagDiscoverer, error) {
	if api == nil {
		return nil, fmt.Errorf("%w: tag discovery needs an EC2 client", ErrInvalidConfig)
	}
	if err := cfg.Tag.Validate(); err != nil {
		return nil, err
	}
	if cfg.PageSize == 0 {
		cfg.PageSize = 1000
	}
	if cfg.PageSize < 5 || cfg.PageSize > 1000 {
		return nil, fmt.Errorf("%w: DescribeInstances page size must be 5..1000, got %d", ErrInvalidConfig, cfg.PageSize)
	}
	return &TagDiscoverer{api: api, tag: cfg.Tag, pageSize: cfg.PageSize}, nil
}

// Addrs returns the sorted, deduplicated private IPv4 addresses of the
// running instances with the join tag, following every page.
func (d *TagDiscoverer) Addrs(ctx context.Context) ([]string, error) {
	p := ec2.NewDescribeInstancesPaginator(d.api, &ec2.DescribeInstancesInput{
		Filters: []types.Filter{
			{Name: aws.String("tag:" + d.tag.Key), Values: []string{d.tag.Value}},
			{Name: aws.String("instance-state-name"), Values: []string{"running"}},
		},
		MaxResults: aws.Int32(d.pageSize),
	})
	seen := map[string]bool{}
	var out []string
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("ec2 DescribeInstances for tag %s: %w", d.tag, err)
		}
		for _, r := range page.Reservations {
			for _, in := range r.Instances {
				ip := aws.ToString(in.PrivateIpAddress)
				if ip == "" || seen[ip] {
					continue
				}
				seen[ip] = true
				out = append(out, ip)
			}
		}
	}
	sort.Strings(out)
	return out, nil
}
