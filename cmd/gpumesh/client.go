package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// clientFlags are the flags every client command takes.
type clientFlags struct {
	address string
	json    bool
	token   string
	timeout time.Duration
	tls     clientTLS // tls.go
}

func addClientFlags(cmd *cobra.Command, f *clientFlags) {
	def := os.Getenv("GPUMESH_ADDR")
	if def == "" {
		def = "127.0.0.1:7947"
	}
	cmd.Flags().StringVar(&f.address, "address", def, "RPC address (host:port) of any gpumesh agent; env GPUMESH_ADDR")
	cmd.Flags().BoolVar(&f.json, "json", false, "print machine-readable JSON")
	cmd.Flags().StringVar(&f.token, "token", os.Getenv("GPUMESH_TOKEN"), "ACL token for mutating calls; env GPUMESH_TOKEN")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 30*time.Second, "how long to wait for the cluster to answer")
	f.tls.addFlags(cmd.Flags())
}

// dial connects to the agent named by --address.
func (f *clientFlags) dial() (pb.ControlClient, func(), error) {
	addr := f.address
	if !strings.Contains(addr, ":") {
		addr += ":7947"
	}
	creds, err := f.tls.dialOption()
	if err != nil {
		return nil, nil, err
	}
	conn, err := grpc.NewClient(addr, creds,
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("agent address %q: %w", f.address, err)
	}
	return pb.NewControlClient(conn), func() { conn.Close() }, nil
}

func (f *clientFlags) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(parent, f.timeout)
	if f.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+f.token)
	}
	return ctx, cancel
}

// explain turns a gRPC error into a message that says what to do.
func (f *clientFlags) explain(err error) error {
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	for _, d := range s.Details() {
		// The agent answered and says which node is missing: its words
		// are the message (not "no agent answers at --address").
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == "gpumesh" {
			return errors.New(s.Message())
		}
	}
	switch s.Code() {
	case codes.Unavailable:
		if hint := tlsHint(s.Message()); hint != "" {
			return errors.New(hint)
		}
		if strings.Contains(s.Message(), "connection refused") || strings.Contains(s.Message(), "dial") {
			return fmt.Errorf("no gpumesh agent answers at %s (start one with `gpumesh agent` or `gpumesh dev`, or set --address / GPUMESH_ADDR)", f.address)
		}
		return fmt.Errorf("cluster unavailable: %s", s.Message())
	case codes.DeadlineExceeded:
		return fmt.Errorf("no answer from %s within %s (is the cluster up? raise --timeout)", f.address, f.timeout)
	case codes.Unauthenticated, codes.PermissionDenied:
		return fmt.Errorf("%s (pass --token or set GPUMESH_TOKEN)", s.Message())
	}
	return fmt.Errorf("%s", s.Message())
}

var jsonOpts = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true, Multiline: true, Indent: "  "}

func printJSON(w io.Writer, m proto.Message) error {
	b, err := jsonOpts.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
}

func ago(t interface{ AsTime() time.Time }) string {
	if t == nil {
		return "-"
	}
	d := time.Since(t.AsTime())
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	}
	return fmt.Sprintf("%dh ago", int(d.Hours()))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// query dials the agent named by --address, makes one call with the
// command's timeout and token, and explains a failure in plain words.
func query[T any](cmd *cobra.Command, f *clientFlags, call func(ctx context.Context, c pb.ControlClient) (T, error)) (T, error) {
	var zero T
	c, done, err := f.dial()
	if err != nil {
		return zero, err
	}
	defer done()
	ctx, cancel := f.ctx(cmd.Context())
	defer cancel()
	resp, err := call(ctx, c)
	if err != nil {
		return zero, f.explain(err)
	}
	return resp, nil
}
