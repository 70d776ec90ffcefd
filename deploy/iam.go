package deploy

import _ "embed"

// IAMPolicy is deploy/iam-policy.json: the least privileges gpumesh needs.
// The statements whose Sid starts with "Agent" belong on the agents'
// instance role (tag discovery; fleet scale-out by the leader); those
// starting with "Launch" belong to whoever runs `gpumesh ec2 launch`. The
// ModifyFleet, TerminateInstances and CreateLaunchTemplate statements only
// match resources tagged gpumesh:cluster (ClusterTagKey).
//
//go:embed iam-policy.json
var IAMPolicy string
