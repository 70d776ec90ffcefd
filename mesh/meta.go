package mesh

import (
	"encoding/binary"
	"fmt"
	"net"
	"strconv"
	"unicode/utf8"

	"github.com/hashicorp/memberlist"
)

// MetaMaxSize is the largest encoded Meta that memberlist gossips (its
// node-metadata limit, in bytes).
const MetaMaxSize = memberlist.MetaMaxSize

// metaVersion1 is the first byte of every record written by this package.
const metaVersion1 byte = 1

// Limits on single Meta fields. They keep every legal record well inside
// MetaMaxSize and bound what a hostile record can make a decoder allocate.
const (
	// MaxIDLen is the longest node ID, in bytes.
	MaxIDLen = 64
	// MaxNameLen is the longest node name, in bytes.
	MaxNameLen = 64
	// MaxLabelLen is the longest instance type, zone, region, GPU model or
	// version string, in bytes.
	MaxLabelLen = 48
	// MaxHostLen is the longest DNS host name in an address, in bytes.
	MaxHostLen = 253
	// MaxGPUs is the most GPUs one node may report.
	MaxGPUs = 64
	// MaxGPUGroups is the most runs of distinct (model, memory) GPUs one
	// record may hold; consecutive identical GPUs form one run.
	MaxGPUGroups = 8
)

// Lifecycle says how the node's capacity was bought.
type Lifecycle uint8

// Lifecycles. LifecycleUnknown is used off EC2.
const (
	LifecycleUnknown Lifecycle = iota
	LifecycleOnDemand
	LifecycleSpot
	lifecycleEnd
)

func (l Lifecycle) String() string {
	switch l {
	case LifecycleUnknown:
		return "unknown"
	case LifecycleOnDemand:
		return "on-demand"
	case LifecycleSpot:
		return "spot"
	}
	return "Lifecycle(" + strconv.Itoa(int(l)) + ")"
}

// ParseLifecycle turns "spot", "on-demand" (or "ondemand", "normal", as
// IMDS reports it) and "unknown"/"" into a Lifecycle.
func ParseLifecycle(s string) (Lifecycle, error) {
	switch s {
	case "", "unknown":
		return LifecycleUnknown, nil
	case "on-demand", "ondemand", "normal":
		return LifecycleOnDemand, nil
	case "spot":
		return LifecycleSpot, nil
	}
	return LifecycleUnknown, fmt.Errorf("%w: lifecycle %q: use spot, on-demand or unknown", ErrInvalidMeta, s)
}

// Status is the node's own view of its readiness for work.
type Status uint8

// Statuses.
const (
	// StatusAlive is a node that takes work.
	StatusAlive Status = iota
	// StatusDraining is a node that finishes or hands off its work and
	// takes no new work (for example after a spot interruption notice).
	StatusDraining
	statusEnd
)

func (s Status) String() string {
	switch s {
	case StatusAlive:
		return "alive"
	case StatusDraining:
		return "draining"
	}
	return "Status(" + strconv.Itoa(int(s)) + ")"
}

// Role is a display hint: what the node last learned its consensus duty
// to be. Membership never acts on it.
type Role uint8

// Roles.
const (
	RoleUnknown Role = iota
	RoleClient
	RoleStandby
	RoleVoter
	roleEnd
)

func (r Role) String() string {
	switch r {
	case RoleUnknown:
		return "unknown"
	case RoleClient:
		return "client"
	case RoleStandby:
		return "standby"
	case RoleVoter:
		return "voter"
	}
	return "Role(" + strconv.Itoa(int(r)) + ")"
}

// GPU describes one GPU of a node.
type GPU struct {
	// Model is the product name, for example "NVIDIA H100 80GB HBM3".
	Model string `json:"model"`
	// MemoryBytes is the GPU's total memory in bytes (0 where unknown).
	MemoryBytes uint64 `json:"memory_bytes"`
}

// Addresses are the endpoints of a node, each "host:port" or "" when the
// node does not serve it.
type Addresses struct {
	// Gossip is the memberlist address (TCP and UDP). New fills it in.
	Gossip string `json:"gossip,omitempty"`
	// RPC is the gRPC control-plane address.
	RPC string `json:"rpc,omitempty"`
	// Raft is the Raft transport address.
	Raft string `json:"raft,omitempty"`
	// HTTP is the metrics, health and dashboard address.
	HTTP string `json:"http,omitempty"`
	// Serve is the serve port, where the node routes service traffic only
	// (`gpumesh agent --serve`); "" when it has none. Records that carry
	// it are read by this build and later ones only (see Encode).
	Serve string `json:"serve,omitempty"`
}

// Meta is the record every node gossips about itself. Its encoded form
// (Encode) must fit in MetaMaxSize bytes.
type Meta struct {
	// ID is the node's stable unique ID (for example a UUID or the EC2
	// instance ID). Set from Config.NodeID.
	ID string `json:"id"`
	// Name is the node's name in the mesh. Set from Config.NodeName.
	Name string `json:"name"`
	// Addrs are the node's endpoints.
	Addrs Addresses `json:"addrs"`
	// GPUs lists the node's GPUs in device order; empty where none.
	GPUs []GPU `json:"gpus,omitempty"`
	// InstanceType is the EC2 instance type ("" off EC2).
	InstanceType string `json:"instance_type,omitempty"`
	// AvailabilityZone is the EC2 availability zone ("" off EC2).
	AvailabilityZone string `json:"availability_zone,omitempty"`
	// Region is the EC2 region ("" off EC2).
	Region string `json:"region,omitempty"`
	// Lifecycle is spot, on-demand or unknown.
	Lifecycle Lifecycle `json:"lifecycle"`
	// Status is alive or draining.
	Status Status `json:"status"`
	// Ineligible marks a node that must not receive new work (set while
	// it is rebalanced away, for example after an EC2 rebalance
	// recommendation).
	Ineligible bool `json:"ineligible,omitempty"`
	// ServerEligible marks a node that may run Raft (voter or standby).
	ServerEligible bool `json:"server_eligible,omitempty"`
	// Role is the consensus duty the node last learned, for display.
	Role Role `json:"role"`
	// Version is the build version of the agent.
	Version string `json:"version,omitempty"`
	// Bootstrapped marks a node that already holds Raft state: newcomers
	// never form a new Raft group with it.
	Bootstrapped bool `json:"bootstrapped,omitempty"`
	// MaxRanks is how many ranks the node runs at once (0: no cap given).
	MaxRanks int `json:"max_ranks,omitempty"`
}

// GPUCount returns the number of GPUs.
func (m Meta) GPUCount() int { return len(m.GPUs) }

// Clone returns a deep copy.
func (m Meta) Clone() Meta {
	if m.GPUs != nil {
		m.GPUs = append([]GPU(nil), m.GPUs...)
	}
	return m
}

// Equal reports whether two records are the same.
func (m Meta) Equal(o Meta) bool {
	if len(m.GPUs) != len(o.GPUs) {
		return false
	}
	for i := range m.GPUs {
		if m.GPUs[i] != o.GPUs[i] {
			return false
		}
	}
	return m.ID == o.ID && m.Name == o.Name && m.Addrs == o.Addrs &&
		m.InstanceType == o.InstanceType && m.AvailabilityZone == o.AvailabilityZone &&
		m.Region == o.Region && m.Lifecycle == o.Lifecycle && m.Status == o.Status &&
		m.Ineligible == o.Ineligible && m.ServerEligible == o.ServerEligible &&
		m.Role == o.Role && m.Version == o.Version &&
		m.Bootstrapped == o.Bootstrapped && m.MaxRanks == o.MaxRanks
}

// Validate checks every field against the limits of the encoding.
func (m Meta) Validate() error {
	if m.ID == "" {
		return fmt.Errorf("%w: node ID is empty: set Config.NodeID", ErrInvalidMeta)
	}
	if m.MaxRanks < 0 || m.MaxRanks > 1<<20 {
		return fmt.Errorf("%w: max ranks %d is out of range 0..%d", ErrInvalidMeta, m.MaxRanks, 1<<20)
	}
	if err := checkString("node ID", m.ID, MaxIDLen); err != nil {
		return err
	}
	if m.Name == "" {
		return fmt.Errorf("%w: node name is empty: set Config.NodeName", ErrInvalidMeta)
	}
	if err := checkString("node name", m.Name, MaxNameLen); err != nil {
		return err
	}
	for _, a := range []struct{ what, v string }{
		{"gossip address", m.Addrs.Gossip}, {"RPC address", m.Addrs.RPC},
		{"Raft address", m.Addrs.Raft}, {"HTTP address", m.Addrs.HTTP}, {"serve address", m.Addrs.Serve},
	} {
		if a.v == "" {
			continue
		}
		if _, _, err := parseHostPort(a.v); err != nil {
			return fmt.Errorf("%w: %s %q: %v", ErrInvalidMeta, a.what, a.v, err)
		}
	}
	for _, s := range []struct{ what, v string }{
		{"instance type", m.InstanceType}, {"availability zone", m.AvailabilityZone},
		{"region", m.Region}, {"version", m.Version},
	} {
		if err := checkString(s.what, s.v, MaxLabelLen); err != nil {
			return err
		}
	}
	if len(m.GPUs) > MaxGPUs {
		return fmt.Errorf("%w: %d GPUs, at most %d are supported", ErrInvalidMeta, len(m.GPUs), MaxGPUs)
	}
	for i, g := range m.GPUs {
		if err := checkString(fmt.Sprintf("GPU %d model", i), g.Model, MaxLabelLen); err != nil {
			return err
		}
	}
	if n := len(gpuGroups(m.GPUs)); n > MaxGPUGroups {
		return fmt.Errorf("%w: GPUs form %d runs of distinct model and memory, at most %d fit: list identical GPUs next to each other",
			ErrInvalidMeta, n, MaxGPUGroups)
	}
	if m.Lifecycle >= lifecycleEnd {
		return fmt.Errorf("%w: lifecycle %d is not one of unknown, on-demand, spot", ErrInvalidMeta, m.Lifecycle)
	}
	if m.Status >= statusEnd {
		return fmt.Errorf("%w: status %d is not one of alive, draining", ErrInvalidMeta, m.Status)
	}
	if m.Role >= roleEnd {
		return fmt.Errorf("%w: role %d is not one of unknown, client, standby, voter", ErrInvalidMeta, m.Role)
	}
	return nil
}

func checkString(what, s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("%w: %s is %d bytes, at most %d allowed", ErrInvalidMeta, what, len(s), max)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalidMeta, what)
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("%w: %s contains control character %U", ErrInvalidMeta, what, r)
		}
	}
	return nil
}

// parseHostPort splits "host:port", requiring a port in 1..65535 and a
// host that is an IP literal or a DNS name of at most MaxHostLen bytes.
func parseHostPort(s string) (string, uint16, error) {
	host, ps, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.ParseUint(ps, 10, 16)
	if err != nil || p == 0 {
		return "", 0, fmt.Errorf("port %q is not in 1..65535", ps)
	}
	if host == "" {
		return "", 0, fmt.Errorf("host is empty")
	}
	if net.ParseIP(host) == nil {
		if len(host) > MaxHostLen {
			return "", 0, fmt.Errorf("host is %d bytes, at most %d allowed", len(host), MaxHostLen)
		}
		for i := 0; i < len(host); i++ {
			c := host[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
				return "", 0, fmt.Errorf("host %q is neither an IP address nor a DNS name", host)
			}
		}
	}
	return host, uint16(p), nil
}

type gpuGroup struct {
	count int
	gpu   GPU
}

func gpuGroups(gpus []GPU) []gpuGroup {
	var out []gpuGroup
	for _, g := range gpus {
		if n := len(out); n > 0 && out[n-1].gpu == g {
			out[n-1].count++
			continue
		}
		out = append(out, gpuGroup{count: 1, gpu: g})
	}
	return out
}

// Address tags in the encoding.
const (
	addrNone     = 0 // not set
	addrIPv4     = 1 // 4-byte IP, 2-byte port
	addrIPv6     = 2 // 16-byte IP, 2-byte port
	addrSameHost = 3 // host of the previous set address, 2-byte port
	addrName     = 4 // length-prefixed DNS name, 2-byte port
)

// Flag bits in the encoding.
const (
	flagServerEligible = 1 << 0
	flagIneligible     = 1 << 1
	flagBootstrapped   = 1 << 2
	flagsKnown         = flagServerEligible | flagIneligible | flagBootstrapped
)

// Encode returns the compact binary form of m (format version 1):
//
//	version byte (1)
//	flags byte (bit 0 server-eligible, bit 1 ineligible, bit 2 bootstrapped)
//	lifecycle, status, role bytes
//	ID, name: uvarint length + bytes
//	4 addresses (gossip, RPC, Raft, HTTP): tag byte, then
//	  IPv4 (4 bytes) | IPv6 (16) | nothing (same host as the previous address) | uvarint length + name;
//	  then a 2-byte big-endian port (no port for tag 0)
//	instance type, zone, region, version: uvarint length + bytes
//	GPU runs: uvarint count of runs, then per run uvarint GPU count,
//	  model (uvarint length + bytes), uvarint memory bytes
//	max ranks: uvarint
//	extensions: zero or more of uvarint key (increasing, from 1), uvarint
//	  length, length bytes; a decoder skips the keys it does not know.
//	  Key 1: the serve address, written as one address above (its "same
//	  host" is the last address set before it).
//
// Identical GPUs next to each other cost one run, so 8 H100s take about as
// many bytes as one. A record without extensions (no serve address) is
// what agents that predate them wrote and read; they refuse one with any.
// Encode refuses a record that fails Validate or whose encoding exceeds
// MetaMaxSize (ErrMetaTooLarge).
func (m Meta) Encode() ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 160)
	var flags byte
	if m.ServerEligible {
		flags |= flagServerEligible
	}
	if m.Ineligible {
		flags |= flagIneligible
	}
	if m.Bootstrapped {
		flags |= flagBootstrapped
	}
	b = append(b, metaVersion1, flags, byte(m.Lifecycle), byte(m.Status), byte(m.Role))
	b = appendString(b, m.ID)
	b = appendString(b, m.Name)
	prevHost := ""
	for _, a := range []string{m.Addrs.Gossip, m.Addrs.RPC, m.Addrs.Raft, m.Addrs.HTTP} {
		b, prevHost = appendAddr(b, a, prevHost)
	}
	for _, s := range []string{m.InstanceType, m.AvailabilityZone, m.Region, m.Version} {
		b = appendString(b, s)
	}
	groups := gpuGroups(m.GPUs)
	b = binary.AppendUvarint(b, uint64(len(groups)))
	for _, g := range groups {
		b = binary.AppendUvarint(b, uint64(g.count))
		b = appendString(b, g.gpu.Model)
		b = binary.AppendUvarint(b, g.gpu.MemoryBytes)
	}
	b = binary.AppendUvarint(b, uint64(m.MaxRanks))
	if m.Addrs.Serve != "" {
		v, _ := appendAddr(nil, m.Addrs.Serve, prevHost)
		b = binary.AppendUvarint(b, extServe)
		b = appendString(b, string(v))
	}
	if len(b) > MetaMaxSize {
		return nil, fmt.Errorf("%w: node metadata encodes to %d bytes, over the %d-byte gossip limit: shorten the name, ID or labels, or list identical GPUs next to each other",
			ErrMetaTooLarge, len(b), MetaMaxSize)
	}
	return b, nil
}

// Extension keys in the encoding.
const (
	extServe = 1 // the serve address
)

// appendAddr appends the address a ("" for none), written relative to the
// host of the last address set before it, and returns the host to pass on.
func appendAddr(b []byte, a, prevHost string) ([]byte, string) {
	if a == "" {
		return append(b, addrNone), prevHost
	}
	host, port, _ := parseHostPort(a) // checked by Validate
	ip := net.ParseIP(host)
	switch {
	case ip != nil && prevHost != "" && net.ParseIP(prevHost).Equal(ip):
		b = append(b, addrSameHost)
	case ip == nil && host == prevHost:
		b = append(b, addrSameHost)
	case ip != nil && ip.To4() != nil:
		b = append(b, addrIPv4)
		b = append(b, ip.To4()...)
	case ip != nil:
		b = append(b, addrIPv6)
		b = append(b, ip.To16()...)
	default:
		b = append(b, addrName)
		b = appendString(b, host)
	}
	return binary.BigEndian.AppendUint16(b, port), host
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// DecodeMeta parses a record written by Encode. It is strict: an unknown
// version, unknown flag bits, out-of-range enums, over-long or non-UTF-8
// strings, truncated input and trailing bytes are all errors (wrapping
// ErrInvalidMeta, or ErrMetaVersion for a version it does not know). It
// never panics and allocates at most O(len(b)) plus MaxGPUs entries.
func DecodeMeta(b []byte) (Meta, error) {
	var m Meta
	if len(b) == 0 {
		return m, fmt.Errorf("%w: empty record", ErrInvalidMeta)
	}
	if len(b) > MetaMaxSize {
		return m, fmt.Errorf("%w: record is %d bytes, over the %d-byte limit", ErrInvalidMeta, len(b), MetaMaxSize)
	}
	if b[0] != metaVersion1 {
		return m, fmt.Errorf("%w: record version %d, this build reads version %d: upgrade the older agents", ErrMetaVersion, b[0], metaVersion1)
	}
	d := decoder{b: b[1:]}
	flags := d.byte()
	if flags&^flagsKnown != 0 && d.err == nil {
		d.fail(fmt.Errorf("unknown flag bits %#x", flags&^flagsKnown))
	}
	m.ServerEligible = flags&flagServerEligible != 0
	m.Ineligible = flags&flagIneligible != 0
	m.Bootstrapped = flags&flagBootstrapped != 0
	m.Lifecycle = Lifecycle(d.byte())
	m.Status = Status(d.byte())
	m.Role = Role(d.byte())
	m.ID = d.string(MaxIDLen)
	m.Name = d.string(MaxNameLen)
	addrs := []*string{&m.Addrs.Gossip, &m.Addrs.RPC, &m.Addrs.Raft, &m.Addrs.HTTP}
	prevHost := ""
	for _, dst := range addrs {
		*dst, prevHost = d.addr(prevHost)
		if d.err != nil {
			return Meta{}, d.err
		}
	}
	m.InstanceType = d.string(MaxLabelLen)
	m.AvailabilityZone = d.string(MaxLabelLen)
	m.Region = d.string(MaxLabelLen)
	m.Version = d.string(MaxLabelLen)
	nGroups := d.uvarint()
	if d.err == nil && nGroups > MaxGPUGroups {
		d.fail(fmt.Errorf("%d GPU runs, at most %d allowed", nGroups, MaxGPUGroups))
	}
	for i := uint64(0); i < nGroups && d.err == nil; i++ {
		count := d.uvarint()
		model := d.string(MaxLabelLen)
		mem := d.uvarint()
		if d.err != nil {
			break
		}
		if count == 0 || count > uint64(MaxGPUs-len(m.GPUs)) {
			d.fail(fmt.Errorf("GPU run of %d GPUs: runs hold 1 to %d GPUs in all", count, MaxGPUs))
			break
		}
		for j := uint64(0); j < count; j++ {
			m.GPUs = append(m.GPUs, GPU{Model: model, MemoryBytes: mem})
		}
	}
	if maxRanks := d.uvarint(); d.err == nil {
		if maxRanks > 1<<20 {
			d.fail(fmt.Errorf("max ranks %d is out of range", maxRanks))
		}
		m.MaxRanks = int(maxRanks)
	}
	for last := uint64(0); d.err == nil && len(d.b) != 0; {
		key := d.uvarint()
		v := d.bytes(int(min(d.uvarint(), uint64(MetaMaxSize+1))))
		if d.err != nil {
			break
		}
		if key <= last {
			d.fail(fmt.Errorf("extension key %d after key %d: keys must increase from 1", key, last))
			break
		}
		last = key
		if key != extServe {
			continue // written by a later build
		}
		e := decoder{b: v}
		m.Addrs.Serve, _ = e.addr(prevHost)
		if e.err == nil && (m.Addrs.Serve == "" || len(e.b) != 0) {
			e.fail(fmt.Errorf("serve address extension is empty or has trailing bytes"))
		}
		if e.err != nil {
			d.err = e.err
		}
	}
	if d.err != nil {
		return Meta{}, d.err
	}
	if err := m.Validate(); err != nil {
		return Meta{}, err
	}
	return m, nil
}

// addr reads one address written by appendAddr ("" for none) and returns
// it with the host to pass on.
func (d *decoder) addr(prevHost string) (string, string) {
	tag := d.byte()
	var host string
	switch tag {
	case addrNone:
		return "", prevHost
	case addrIPv4:
		host = net.IP(d.bytes(4)).String()
	case addrIPv6:
		ip := net.IP(d.bytes(16))
		if d.err == nil && ip.To4() != nil {
			d.fail(fmt.Errorf("IPv4 address written as IPv6"))
		}
		host = ip.String()
	case addrSameHost:
		if prevHost == "" && d.err == nil {
			d.fail(fmt.Errorf("address refers to a previous host but there is none"))
		}
		host = prevHost
	case addrName:
		host = d.string(MaxHostLen)
		if d.err == nil && (host == "" || net.ParseIP(host) != nil) {
			d.fail(fmt.Errorf("host name %q is empty or an IP address", host))
		}
	default:
		if d.err == nil {
			d.fail(fmt.Errorf("unknown address tag %d", tag))
		}
	}
	port := d.uint16()
	if d.err != nil {
		return "", prevHost
	}
	return net.JoinHostPort(host, strconv.Itoa(int(port))), host
}

// decoder reads from b and remembers the first error; after an error
// every read returns a zero value.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(err error) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %v", ErrInvalidMeta, err)
	}
}

func (d *decoder) bytes(n int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b) < n {
		d.fail(fmt.Errorf("record truncated"))
		return nil
	}
	out := d.b[:n:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) byte() byte {
	if v := d.bytes(1); v != nil {
		return v[0]
	}
	return 0
}

func (d *decoder) uint16() uint16 {
	if v := d.bytes(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(fmt.Errorf("bad or truncated varint"))
		return 0
	}
	if n != len(binary.AppendUvarint(nil, v)) {
		d.fail(fmt.Errorf("non-minimal varint"))
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string(max int) string {
	n := d.uvarint()
	if d.err != nil {
		return ""
	}
	if n > uint64(max) {
		d.fail(fmt.Errorf("string of %d bytes, at most %d allowed", n, max))
		return ""
	}
	v := d.bytes(int(n))
	if d.err != nil {
		return ""
	}
	return string(v)
}
