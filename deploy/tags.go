package deploy

import (
	"fmt"
	"strings"
)

// ClusterTagKey is the tag that gpumesh adds, next to the join tag, to the
// fleets, launch templates and instances it creates, with the join tag's
// value (the cluster's name). The policies of AgentPolicy and LauncherPolicy
// match on it being equal to that name, so that one cluster's roles can only
// touch that cluster's fleets and instances.
const ClusterTagKey = "gpumesh:cluster"

// Tag is one EC2 tag (the join tag "KEY=VALUE").
type Tag struct {
	Key   string
	Value string
}

// String returns "KEY=VALUE".
func (t Tag) String() string { return t.Key + "=" + t.Value }

// ParseTag parses "KEY=VALUE". The key must be non-empty; the value may be
// empty ("KEY=" matches instances whose tag KEY has an empty value). Keys
// starting with "aws:" are reserved by AWS and rejected.
func ParseTag(s string) (Tag, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok {
		return Tag{}, fmt.Errorf("%w: %q must be KEY=VALUE, e.g. gpumesh:cluster=prod", ErrInvalidTag, s)
	}
	t := Tag{Key: strings.TrimSpace(k), Value: strings.TrimSpace(v)}
	if err := t.Validate(); err != nil {
		return Tag{}, err
	}
	return t, nil
}

// Validate checks the tag against EC2's limits (key 1-128 and value 0-256
// characters, no "aws:" prefix).
func (t Tag) Validate() error {
	switch {
	case t.Key == "":
		return fmt.Errorf("%w: the key is empty; use KEY=VALUE, e.g. gpumesh:cluster=prod", ErrInvalidTag)
	case len(t.Key) > 128:
		return fmt.Errorf("%w: key %q is longer than 128 characters", ErrInvalidTag, t.Key)
	case len(t.Value) > 256:
		return fmt.Errorf("%w: value of %q is longer than 256 characters", ErrInvalidTag, t.Key)
	case strings.HasPrefix(strings.ToLower(t.Key), "aws:"):
		return fmt.Errorf("%w: key %q uses the reserved prefix aws:; pick another key", ErrInvalidTag, t.Key)
	}
	return nil
}

// shellSafe reports whether s can be written unquoted into a shell command
// line and a systemd ExecStart= line (no whitespace, quotes or
// metacharacters).
func shellSafe(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case strings.ContainsRune("+-=._:/@,", r):
		default:
			return false
		}
	}
	return true
}
