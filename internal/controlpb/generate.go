// Package controlpb holds the gpumesh.v1 protocol buffers: the cluster state
// model (nodes, jobs, allocations) and the Control service.
package controlpb

//go:generate protoc --proto_path=. --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative control.proto
