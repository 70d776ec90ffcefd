package deploy

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// MemMetadata is an in-memory Metadata for tests of code that consumes
// identities and notices (the agent's drain path), without an IMDS server.
// Set items with Set, or the notices with Interrupt and Rebalance; Fail
// makes every Get return an error. Safe for concurrent use.
type MemMetadata struct {
	mu    sync.Mutex
	items map[string]string
	err   error
	gets  int
}

var _ Metadata = (*MemMetadata)(nil)

// NewMemMetadata returns a source that knows the given identity.
func NewMemMetadata(id Identity) *MemMetadata {
	m := &MemMetadata{items: map[string]string{}}
	if id.OnEC2() {
		m.items["instance-id"] = id.InstanceID
		m.items["instance-type"] = id.InstanceType
		m.items["placement/availability-zone"] = id.AvailabilityZone
		m.items["placement/region"] = id.Region
		m.items["local-ipv4"] = id.PrivateIP
		m.items["instance-life-cycle"] = string(id.Lifecycle)
	}
	return m
}

// Set sets (or, with an empty value, removes) one item.
func (m *MemMetadata) Set(path, value string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if value == "" {
		delete(m.items, path)
		return
	}
	m.items[path] = value
}

// Interrupt publishes a spot interruption notice with the given action and
// deadline.
func (m *MemMetadata) Interrupt(action string, deadline time.Time) {
	m.Set(PathSpotInstanceAction, fmt.Sprintf(`{"action":%q,"time":%q}`, action, deadline.UTC().Format(time.RFC3339)))
}

// Rebalance publishes a rebalance recommendation.
func (m *MemMetadata) Rebalance(at time.Time) {
	m.Set(PathRebalance, fmt.Sprintf(`{"noticeTime":%q}`, at.UTC().Format(time.RFC3339)))
}

// Fail makes every Get return err (nil restores normal answers).
func (m *MemMetadata) Fail(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.err = err
}

// Gets returns how many Get calls have been made.
func (m *MemMetadata) Gets() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gets
}

// Get implements Metadata.
func (m *MemMetadata) Get(ctx context.Context, path string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gets++
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if m.err != nil {
		return "", m.err
	}
	v, ok := m.items[path]
	if !ok {
		return "", fmt.Errorf("%w: %s", ErrMetadataNotFound, path)
	}
	return v, nil
}
