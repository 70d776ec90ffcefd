// Package fsmpb holds the Raft log commands and the snapshot format of the
// consensus FSM.
package fsmpb

//go:generate protoc --proto_path=. --proto_path=/usr/include --go_out=. --go_opt=paths=source_relative fsm.proto
