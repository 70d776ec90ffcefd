package mesh

import "fmt"

// Text forms, so that Member and Meta print readable JSON (gpumesh
// members --json) and parse back.

// MarshalText implements encoding.TextMarshaler.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *State) UnmarshalText(b []byte) error {
	return parseEnum(b, s, "state", []State{StateAlive, StateSuspect, StateDead, StateLeft})
}

// MarshalText implements encoding.TextMarshaler.
func (l Lifecycle) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (l *Lifecycle) UnmarshalText(b []byte) error {
	v, err := ParseLifecycle(string(b))
	if err != nil {
		return err
	}
	*l = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (s Status) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Status) UnmarshalText(b []byte) error {
	return parseEnum(b, s, "status", []Status{StatusAlive, StatusDraining})
}

// MarshalText implements encoding.TextMarshaler.
func (r Role) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (r *Role) UnmarshalText(b []byte) error {
	return parseEnum(b, r, "role", []Role{RoleUnknown, RoleClient, RoleStandby, RoleVoter})
}

// MarshalText implements encoding.TextMarshaler.
func (t EventType) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

func parseEnum[T fmt.Stringer](b []byte, dst *T, what string, all []T) error {
	var names []string
	for _, v := range all {
		if v.String() == string(b) {
			*dst = v
			return nil
		}
		names = append(names, v.String())
	}
	return fmt.Errorf("%w: %s %q is not one of %q", ErrInvalidMeta, what, b, names)
}
