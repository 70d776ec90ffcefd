package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
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
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node"
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
		def = net.JoinHostPort("127.0.0.1", strconv.Itoa(node.DefaultRPCPort))
	}
	cmd.Flags().StringVar(&f.address, "address", def, "RPC address (host:port) of any gpumesh agent; env GPUMESH_ADDR")
	cmd.Flags().BoolVar(&f.json, "json", false, "print machine-readable JSON")
	cmd.Flags().StringVar(&f.token, "token", os.Getenv("GPUMESH_TOKEN"), "ACL token for calls that change the cluster (needed only when the agents have one); env GPUMESH_TOKEN")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 30*time.Second, "how long to wait for the cluster to answer")
	f.tls.addFlags(cmd.Flags())
}

// readOnly hides --token on a command whose calls never need it (reads are
// open to whoever reaches the RPC port). The flag is still accepted, so
// scripts that pass it to every command keep working.
func readOnly(cmd *cobra.Command) { _ = cmd.Flags().MarkHidden("token") }

// dial connects to the agent named by --address.
func (f *clientFlags) dial() (pb.ControlClient, func(), error) {
	addr := f.address
	if !strings.Contains(addr, ":") {
		addr = net.JoinHostPort(addr, strconv.Itoa(node.DefaultRPCPort))
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

// printJSON writes m as indented JSON: proto field names, every field
// present, 64-bit integers as numbers (protojson writes them as strings,
// `"generation": "1"`), and one stable layout (protojson varies its spacing
// on purpose; encoding/json does not).
func printJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return err
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(int64sAsNumbers(v, m.ProtoReflect().Descriptor()))
}

// int64sAsNumbers turns the strings protojson writes for 64-bit integer
// fields of md back into JSON numbers, through nested messages, lists and
// maps. Well-known types (timestamps, durations, structs) keep their form.
func int64sAsNumbers(v any, md protoreflect.MessageDescriptor) any {
	obj, ok := v.(map[string]any)
	if !ok || md.FullName().Parent() == "google.protobuf" {
		return v
	}
	conv := func(x any, fd protoreflect.FieldDescriptor) any {
		switch fd.Kind() {
		case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind, protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
			if s, ok := x.(string); ok {
				return json.Number(s)
			}
		case protoreflect.MessageKind, protoreflect.GroupKind:
			return int64sAsNumbers(x, fd.Message())
		}
		return x
	}
	for k, x := range obj {
		fd := md.Fields().ByName(protoreflect.Name(k))
		if fd == nil {
			fd = md.Fields().ByJSONName(k)
		}
		if fd == nil {
			continue
		}
		switch {
		case fd.IsMap():
			if m, ok := x.(map[string]any); ok {
				for mk, mv := range m {
					m[mk] = conv(mv, fd.MapValue())
				}
			}
		case fd.IsList():
			if l, ok := x.([]any); ok {
				for i := range l {
					l[i] = conv(l[i], fd)
				}
			}
		default:
			obj[k] = conv(x, fd)
		}
	}
	return obj
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
}

// ago says how long before now t was ("5s ago", "3m ago", "2h ago",
// "4d ago"), or "-" when t is unset: a rank that never started has no start
// time, and an unset or zero timestamp must not print as the Unix epoch.
func ago(t *timestamppb.Timestamp) string { return agoAt(t, time.Now()) }

func agoAt(t *timestamppb.Timestamp, now time.Time) string {
	if t == nil || !t.IsValid() || t.GetSeconds() <= 0 {
		return "-"
	}
	d := now.Sub(t.AsTime())
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return fmt.Sprintf("%dd ago", int(d.Hours()/24))
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
