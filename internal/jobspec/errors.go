package jobspec

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

var (
	// ErrInvalid is wrapped by every validation error.
	ErrInvalid = errors.New("job spec")
	// ErrTooLarge is returned for specs over MaxSpecBytes.
	ErrTooLarge = errors.New("job spec too large")
)

// Error is one problem with a spec: the field at fault and what to do.
// Parse fills File, Line and Column with the place in the person's own
// YAML or JSON; Validate, which sees only the decoded spec, leaves them 0.
type Error struct {
	File   string // the spec's file name ("" when unknown, "-" for stdin)
	Line   int    // 1-based line in File; 0 when unknown
	Column int    // 1-based column in File; 0 when unknown
	Field  string // dotted path, e.g. "allreduce.sizes[1]"
	Msg    string // what is wrong and what to do
}

// where is "FILE:LINE:COL", "FILE", "line LINE:COL" or "".
func (e *Error) where() string {
	pos := e.pos()
	switch {
	case e.File != "" && pos != "":
		return e.File + ":" + pos
	case e.File != "":
		return e.File
	case pos != "":
		return "line " + pos
	}
	return ""
}

// pos is "LINE:COL", "LINE" or "".
func (e *Error) pos() string {
	switch {
	case e.Line > 0 && e.Column > 0:
		return fmt.Sprintf("%d:%d", e.Line, e.Column)
	case e.Line > 0:
		return fmt.Sprint(e.Line)
	}
	return ""
}

// detail is the error without its "job spec" prefix and file name.
func (e *Error) detail() string {
	if e.Field == "" {
		return e.Msg
	}
	return e.Field + ": " + e.Msg
}

func (e *Error) Error() string {
	if w := e.where(); w != "" {
		return "job spec " + w + ": " + e.detail()
	}
	return "job spec: " + e.detail()
}

// Unwrap lets errors.Is(err, ErrInvalid) match.
func (e *Error) Unwrap() error { return ErrInvalid }

// Errors is every problem found in one spec, in the order of the file
// (problems without a place last). errors.Is(err, ErrInvalid) matches it and
// errors.As finds each *Error.
type Errors []*Error

func (l Errors) Error() string {
	if len(l) == 1 {
		return l[0].Error()
	}
	file := ""
	if len(l) > 0 && l[0].File != "" {
		file = " " + l[0].File
	}
	var b strings.Builder
	fmt.Fprintf(&b, "job spec%s: %d problems:", file, len(l))
	for _, e := range l {
		b.WriteString("\n  ")
		if p := e.pos(); p != "" {
			b.WriteString(p + ": ")
		}
		b.WriteString(e.detail())
	}
	return b.String()
}

// Unwrap returns each problem, so that errors.Is and errors.As see them.
func (l Errors) Unwrap() []error {
	out := make([]error, len(l))
	for i, e := range l {
		out[i] = e
	}
	return out
}

// err is nil for an empty list, the list otherwise.
func (l Errors) err() error {
	if len(l) == 0 {
		return nil
	}
	return l
}

// sortByPlace orders problems by line and column; those without a place
// keep their order after the others.
func (l Errors) sortByPlace() {
	sort.SliceStable(l, func(i, j int) bool {
		a, b := l[i], l[j]
		if (a.Line == 0) != (b.Line == 0) {
			return b.Line == 0
		}
		if a.Line != b.Line {
			return a.Line < b.Line
		}
		return a.Column < b.Column
	})
}

func fieldErr(field, format string, args ...any) *Error {
	return &Error{Field: field, Msg: fmt.Sprintf(format, args...)}
}
