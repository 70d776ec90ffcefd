// Package deploy is gpumesh's AWS integration: the IMDSv2 identity of the
// instance, spot interruption and rebalance notices, EC2 tag discovery,
// user-data and systemd rendering, and EC2 Fleet launch with aws-sdk-go-v2.
package deploy
