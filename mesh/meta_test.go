package mesh

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func h100Meta() Meta {
	m := Meta{
		ID:               "i-0123456789abcdef0",
		Name:             "gpu-node-17",
		Addrs:            Addresses{Gossip: "10.0.3.17:7946", RPC: "10.0.3.17:7947", Raft: "10.0.3.17:7948", HTTP: "10.0.3.17:7949"},
		InstanceType:     "p5.48xlarge",
		AvailabilityZone: "us-east-1a",
		Region:           "us-east-1",
		Lifecycle:        LifecycleSpot,
		Status:           StatusDraining,
		Ineligible:       true,
		ServerEligible:   true,
		Role:             RoleStandby,
		Version:          "v0.3.1-12-gabcdef0",
	}
	for i := 0; i < 8; i++ {
		m.GPUs = append(m.GPUs, GPU{Model: "NVIDIA H100 80GB HBM3", MemoryBytes: 85520809984})
	}
	return m
}

func TestMetaRoundTrip(t *testing.T) {
	cases := map[string]Meta{
		"8 H100":           h100Meta(),
		"minimal, no GPUs": {ID: "a", Name: "b"},
		"mixed GPUs, IPv6 and DNS": {
			ID: "4f1c2b9e-7c1e-4d8a-9d64-0f3e6c1b2a11", Name: "mixed",
			Addrs: Addresses{Gossip: "[fd00::1]:7946", RPC: "[fd00::1]:7947", Raft: "node.internal:7948", HTTP: "node.internal:7949"},
			GPUs: []GPU{{"Tesla T4", 16106127360}, {"Tesla T4", 16106127360}, {"NVIDIA A10G", 24146608128},
				{"Tesla T4", 16106127360}, {"unknown", 0}},
			Lifecycle: LifecycleOnDemand, Role: RoleVoter,
		},
		"only some addresses":  {ID: "x", Name: "y", Addrs: Addresses{RPC: "127.0.0.2:7947", HTTP: "127.0.0.2:7949"}},
		"serve port":           {ID: "x", Name: "y", Addrs: Addresses{RPC: "127.0.0.2:7947", HTTP: "127.0.0.2:7949", Serve: "127.0.0.2:7950"}},
		"serve port elsewhere": {ID: "x", Name: "y", Addrs: Addresses{HTTP: "[fd00::1]:7949", Serve: "10.1.2.3:80"}, MaxRanks: 4},
		"serve port by name":   {ID: "x", Name: "y", Addrs: Addresses{Serve: "svc.internal:7950"}},
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			b, err := in.Encode()
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			out, err := DecodeMeta(b)
			if err != nil {
				t.Fatalf("DecodeMeta: %v", err)
			}
			if !out.Equal(in) {
				t.Fatalf("round trip changed the record:\n in  %+v\n out %+v", in, out)
			}
		})
	}
}

func TestMetaCompact(t *testing.T) {
	m := h100Meta()
	b, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	one := h100Meta()
	one.GPUs = one.GPUs[:1]
	b1, err := one.Encode()
	if err != nil {
		t.Fatal(err)
	}
	// Eight identical GPUs cost the same as one: one run.
	if len(b) != len(b1) {
		t.Errorf("8 identical GPUs encode to %d bytes, 1 GPU to %d: runs are not collapsed", len(b), len(b1))
	}
	// Four addresses on one IP cost 4+2 bytes for the first and 2 for each other.
	if len(b) > 150 {
		t.Errorf("a full p5 record encodes to %d bytes, want <= 150", len(b))
	}
	t.Logf("p5.48xlarge record with 8 GPUs: %d bytes", len(b))
}

// The serve address travels as an extension after the fields agents
// without it read: a record without one is byte for byte what they wrote
// (they keep reading it), one with it costs 5 bytes on the HTTP address's
// host, and a decoder skips extension keys it does not know (a later
// build's) but not keys out of order.
func TestMetaServeExtension(t *testing.T) {
	without := h100Meta()
	old, err := without.Encode()
	if err != nil {
		t.Fatal(err)
	}
	// h100Meta's encoding as agents before the serve address wrote it.
	const before = "010302010213692d30313233343536373839616263646566300b6770752d6e6f64652d3137010a0003111f0a031f0b031f0c031f0d" +
		"0b70352e3438786c617267650a75732d656173742d31610975732d656173742d311276302e332e312d31322d6761626364656630" +
		"0108154e5649444941204831303020383047422048424d338080c0cbbe0200"
	if got := fmt.Sprintf("%x", old); got != before {
		t.Fatalf("a record without a serve address changed its encoding:\n got  %s\n want %s", got, before)
	}
	with := h100Meta()
	with.Addrs.Serve = "10.0.3.17:7950"
	b, err := with.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != len(old)+5 || !bytes.HasPrefix(b, old) {
		t.Fatalf("the serve address costs %d bytes (want 5, appended)", len(b)-len(old))
	}
	later := append(bytes.Clone(b), 7, 2, 'h', 'i') // key 7, two bytes
	got, err := DecodeMeta(later)
	if err != nil || !got.Equal(with) {
		t.Fatalf("a later build's extension: %v, %+v", err, got)
	}
	for name, bad := range map[string][]byte{
		"key out of order": append(bytes.Clone(later), 3, 0),
		"key 0":            append(bytes.Clone(old), 0, 0),
		"empty serve":      append(bytes.Clone(old), 1, 1, 0),
		"serve trailing":   append(append(bytes.Clone(old), 1, 4), append(bytes.Clone(b[len(b)-3:]), 9)...),
		"length past end":  append(bytes.Clone(old), 2, 9, 1),
	} {
		if _, err := DecodeMeta(bad); !errors.Is(err, ErrInvalidMeta) {
			t.Errorf("%s: DecodeMeta got %v, want ErrInvalidMeta", name, err)
		}
	}
}

func TestMetaTooLarge(t *testing.T) {
	m := h100Meta()
	host := strings.Repeat("a", 60) + "." + strings.Repeat("b", 60) + "." + strings.Repeat("c", 60)
	m.Addrs = Addresses{Gossip: host + ":1", RPC: "x" + host + ":2", Raft: "y" + host + ":3", HTTP: "z" + host + ":4"}
	_, err := m.Encode()
	if !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("Encode of an oversized record: got %v, want ErrMetaTooLarge", err)
	}
	if !strings.Contains(err.Error(), "512") {
		t.Errorf("error should name the limit: %v", err)
	}
}

func TestMetaValidate(t *testing.T) {
	cases := map[string]func(*Meta){
		"empty ID":          func(m *Meta) { m.ID = "" },
		"empty name":        func(m *Meta) { m.Name = "" },
		"long ID":           func(m *Meta) { m.ID = strings.Repeat("i", MaxIDLen+1) },
		"bad address":       func(m *Meta) { m.Addrs.RPC = "10.0.0.1" },
		"port 0":            func(m *Meta) { m.Addrs.Raft = "10.0.0.1:0" },
		"bad host":          func(m *Meta) { m.Addrs.HTTP = "a b:80" },
		"control char":      func(m *Meta) { m.Region = "us\x00east" },
		"bad utf8":          func(m *Meta) { m.Version = "\xff" },
		"lifecycle":         func(m *Meta) { m.Lifecycle = 9 },
		"status":            func(m *Meta) { m.Status = 9 },
		"role":              func(m *Meta) { m.Role = 9 },
		"too many GPUs":     func(m *Meta) { m.GPUs = make([]GPU, MaxGPUs+1) },
		"too many GPU runs": func(m *Meta) { m.GPUs = interleaved(MaxGPUGroups + 1) },
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			m := h100Meta()
			mod(&m)
			if err := m.Validate(); !errors.Is(err, ErrInvalidMeta) {
				t.Fatalf("Validate: got %v, want ErrInvalidMeta", err)
			}
			if _, err := m.Encode(); !errors.Is(err, ErrInvalidMeta) {
				t.Fatalf("Encode: got %v, want ErrInvalidMeta", err)
			}
		})
	}
}

func interleaved(n int) []GPU {
	var g []GPU
	for i := 0; i < n; i++ {
		g = append(g, GPU{Model: []string{"A", "B"}[i%2]})
	}
	return g
}

func TestDecodeMetaRejects(t *testing.T) {
	good, err := h100Meta().Encode()
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(f func([]byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := map[string]struct {
		b    []byte
		want error
	}{
		"empty":           {nil, ErrInvalidMeta},
		"future version":  {mutate(func(b []byte) []byte { b[0] = 2; return b }), ErrMetaVersion},
		"unknown flag":    {mutate(func(b []byte) []byte { b[1] |= 0x80; return b }), ErrInvalidMeta},
		"bad lifecycle":   {mutate(func(b []byte) []byte { b[2] = 7; return b }), ErrInvalidMeta},
		"trailing byte":   {append(bytes.Clone(good), 0), ErrInvalidMeta},
		"too long":        {make([]byte, MetaMaxSize+1), ErrInvalidMeta},
		"huge GPU count":  {[]byte{1, 0, 0, 0, 0, 1, 'a', 1, 'b', 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 'x', 0}, ErrInvalidMeta},
		"same host first": {[]byte{1, 0, 0, 0, 0, 1, 'a', 1, 'b', 3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}, ErrInvalidMeta},
		"non-minimal len": {[]byte{1, 0, 0, 0, 0, 0x81, 0x00, 'a'}, ErrInvalidMeta},
	}
	for i := 1; i < len(good); i++ {
		cases[fmt.Sprintf("truncated at %d", i)] = struct {
			b    []byte
			want error
		}{good[:i], ErrInvalidMeta}
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := DecodeMeta(c.b); !errors.Is(err, c.want) {
				t.Fatalf("DecodeMeta: got %v, want %v", err, c.want)
			}
		})
	}
}

func TestParseLifecycle(t *testing.T) {
	for in, want := range map[string]Lifecycle{"spot": LifecycleSpot, "on-demand": LifecycleOnDemand, "normal": LifecycleOnDemand, "": LifecycleUnknown} {
		got, err := ParseLifecycle(in)
		if err != nil || got != want {
			t.Errorf("ParseLifecycle(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := ParseLifecycle("reserved"); !errors.Is(err, ErrInvalidMeta) {
		t.Errorf("ParseLifecycle(reserved): got %v, want ErrInvalidMeta", err)
	}
}

// FuzzDecodeMeta checks that DecodeMeta never panics, and that whatever it
// accepts is valid, encodes, and decodes back to the same record.
func FuzzDecodeMeta(f *testing.F) {
	for _, m := range []Meta{h100Meta(), {ID: "a", Name: "b"}} {
		b, err := m.Encode()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMeta(b)
		if err != nil {
			if !errors.Is(err, ErrInvalidMeta) && !errors.Is(err, ErrMetaVersion) {
				t.Fatalf("error %v wraps neither ErrInvalidMeta nor ErrMetaVersion", err)
			}
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("decoded record fails Validate: %v", err)
		}
		b2, err := m.Encode()
		if err != nil {
			t.Fatalf("decoded record does not encode: %v", err)
		}
		m2, err := DecodeMeta(b2)
		if err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if !m2.Equal(m) {
			t.Fatalf("re-encoding changed the record:\n %+v\n %+v", m, m2)
		}
		if len(b2) > len(b) {
			t.Fatalf("canonical encoding (%d bytes) is longer than the accepted input (%d bytes)", len(b2), len(b))
		}
	})
}

func TestMetaJSON(t *testing.T) {
	in := h100Meta()
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"lifecycle":"spot"`, `"status":"draining"`, `"role":"standby"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON %s lacks %s", b, want)
		}
	}
	var out Meta
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if !out.Equal(in) {
		t.Fatalf("JSON round trip changed the record: %+v", out)
	}
	if err := json.Unmarshal([]byte(`{"role":"king"}`), &out); err == nil {
		t.Error("unknown role accepted")
	}
	s, _ := json.Marshal(Member{State: StateSuspect})
	if !strings.Contains(string(s), `"state":"suspect"`) {
		t.Errorf("member JSON %s", s)
	}
}
