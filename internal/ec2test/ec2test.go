// Package ec2test starts an EC2 Fleet for tests: the in-process EC2 API
// (deploy/ec2fake) behind an httptest server, the AWS SDK's environment
// pointed at nothing else, and a maintain-type fleet created through the
// SDK as an operator would.
package ec2test

import (
	"context"
	"net/http/httptest"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/gpumesh/gpumesh/deploy"
	"github.com/gpumesh/gpumesh/deploy/ec2fake"
)

// Region is the region the fleet is created in.
const Region = "us-east-1"

// Fleet is a running fake EC2 API with one fleet.
type Fleet struct {
	Fake     *ec2fake.Server
	Endpoint string // the API's URL, for deploy.AWSConfig.Endpoint / --ec2-endpoint
	ID       string // the fleet's ID
}

// StartFleet starts the API (stopped at the test's end) and creates a
// spot fleet of capacity instances from a launch template.
func StartFleet(t testing.TB, capacity int32) Fleet {
	t.Helper()
	fake := ec2fake.New()
	srv := httptest.NewServer(fake)
	t.Cleanup(srv.Close)
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	api, err := deploy.NewEC2Client(context.Background(), deploy.AWSConfig{Region: Region, Endpoint: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	out, err := api.CreateFleet(context.Background(), &ec2.CreateFleetInput{
		Type: ec2types.FleetTypeMaintain,
		LaunchTemplateConfigs: []ec2types.FleetLaunchTemplateConfigRequest{{
			LaunchTemplateSpecification: &ec2types.FleetLaunchTemplateSpecificationRequest{LaunchTemplateId: aws.String("lt-1"), Version: aws.String("$Latest")},
		}},
		TargetCapacitySpecification: &ec2types.TargetCapacitySpecificationRequest{TotalTargetCapacity: aws.Int32(capacity), DefaultTargetCapacityType: ec2types.DefaultTargetCapacityTypeSpot},
	})
	if err != nil {
		t.Fatal(err)
	}
	return Fleet{Fake: fake, Endpoint: srv.URL, ID: aws.ToString(out.FleetId)}
}
