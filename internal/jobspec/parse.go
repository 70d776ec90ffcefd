package jobspec

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// Parse reads a YAML or JSON job spec, applies defaults and validates it.
// It is ParseFile without a file name.
func Parse(data []byte) (*pb.JobSpec, error) { return ParseFile("", data) }

// ParseFile reads a YAML or JSON job spec (JSON is read as YAML, so both
// give the same lines), applies defaults and validates it. On failure it
// returns Errors holding every problem found, each with the field's path
// and its line and column in data; file names the source in messages.
//
// The document is checked against the JobSpec schema before it is
// decoded: unknown fields (with a "did you mean"), a list where a value
// belongs, words where numbers belong and durations without a unit are all
// reported at once, at their place in the file.
func ParseFile(file string, data []byte) (*pb.JobSpec, error) {
	if len(data) > MaxSpecBytes {
		return nil, fmt.Errorf("%w: %d bytes; a spec may hold at most %d bytes (put data in files the job reads, not in the spec)", ErrTooLarge, len(data), MaxSpecBytes)
	}
	fail := func(line, col int, msg string) error {
		return Errors{{File: file, Line: line, Column: col, Msg: msg}}
	}
	if strings.TrimSpace(string(data)) == "" {
		return nil, fail(0, 0, "the file is empty; a spec needs at least type, ranks and the type's section")
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		line, msg := yamlErrorLine(err)
		if lines := strings.Split(string(data), "\n"); line > 0 && line <= len(lines) && strings.Contains(lines[line-1], "\t") && !strings.Contains(msg, "tab") {
			msg += " (a tab character: YAML indents with spaces)"
		}
		return nil, fail(line, 0, "not valid YAML or JSON: "+msg)
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil, fail(0, 0, "the document must be a mapping of fields (name, type, ranks, ...)")
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fail(root.Line, root.Column, "the document must be a mapping of fields (name, type, ranks, ...)")
	}
	w := &walker{file: file, places: map[string][2]int{}}
	w.message(root, (&pb.JobSpec{}).ProtoReflect().Descriptor(), "")
	if len(w.errs) > 0 {
		w.errs.sortByPlace()
		return nil, w.errs
	}
	var v any
	if err := root.Decode(&v); err != nil {
		return nil, fail(root.Line, root.Column, "not valid YAML or JSON: "+err.Error())
	}
	js, err := json.Marshal(v)
	if err != nil {
		return nil, fail(0, 0, "cannot be read as JSON: "+err.Error())
	}
	spec := &pb.JobSpec{}
	if err := (protojson.UnmarshalOptions{}).Unmarshal(js, spec); err != nil {
		// The schema walk should have caught it; say it without the
		// position inside the internal JSON, which means nothing to a person.
		return nil, fail(0, 0, cleanProtoError(err))
	}
	ApplyDefaults(spec)
	if err := Validate(spec); err != nil {
		if l, ok := err.(Errors); ok {
			for _, e := range l {
				e.File = file
				e.Line, e.Column = w.place(e.Field)
			}
			l.sortByPlace()
		}
		return nil, err
	}
	return spec, nil
}

var yamlLineRE = regexp.MustCompile(`^yaml: line (\d+): `)

// yamlErrorLine splits "yaml: line 3: did not find expected key" into 3 and
// the rest.
func yamlErrorLine(err error) (int, string) {
	msg := err.Error()
	if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
		n, _ := strconv.Atoi(m[1])
		rest := msg[len(m[0]):]
		// The YAML parser numbers the lines of errors it reports with a
		// context (an unclosed [ or {, a block mapping) from 0.
		if strings.HasPrefix(rest, "did not find expected") {
			n++
		}
		return n, rest
	}
	return 0, strings.TrimPrefix(msg, "yaml: ")
}

var protoErrPrefix = regexp.MustCompile(`^proto:\s*(\(line \d+:\d+\):\s*)?`)

func cleanProtoError(err error) string {
	msg := protoErrPrefix.ReplaceAllString(err.Error(), "")
	return strings.ReplaceAll(msg, "\u00a0", " ")
}

// walker checks a YAML node tree against a message descriptor, collecting
// problems, coercing scalars the schema holds as strings (so that
// `command: [train.py, --epochs, 3]` means what a person expects) and
// rewriting durations into the form protojson reads. It records where every
// field it saw sits, for placing Validate's errors.
type walker struct {
	file   string
	errs   Errors
	places map[string][2]int // field path → line, column of its value
}

func (w *walker) add(n *yaml.Node, field, format string, args ...any) {
	w.errs = append(w.errs, &Error{File: w.file, Line: n.Line, Column: n.Column, Field: field, Msg: fmt.Sprintf(format, args...)})
}

// place returns where field (or its nearest parent present in the file)
// sits; 0, 0 when nothing of it is in the file.
func (w *walker) place(field string) (int, int) {
	for field != "" {
		if p, ok := w.places[field]; ok {
			return p[0], p[1]
		}
		i := strings.LastIndexAny(field, ".[")
		if i < 0 {
			break
		}
		field = field[:i]
	}
	return 0, 0
}

func resolve(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.Tag == "!!null" }

func kindWord(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	return fmt.Sprintf("%q", n.Value)
}

const durationName = "google.protobuf.Duration"

func (w *walker) message(n *yaml.Node, md protoreflect.MessageDescriptor, path string) {
	n = resolve(n)
	if isNull(n) {
		return
	}
	if n.Kind != yaml.MappingNode {
		w.add(n, path, "want a mapping of fields (%s), got %s", strings.Join(fieldNames(md), ", "), kindWord(n))
		return
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		key, val := resolve(n.Content[i]), resolve(n.Content[i+1])
		fd := md.Fields().ByName(protoreflect.Name(key.Value))
		if fd == nil {
			fd = md.Fields().ByJSONName(key.Value)
		}
		if fd == nil {
			w.add(key, join(path, key.Value), "%s", unknownField(key.Value, md, path))
			continue
		}
		fp := join(path, string(fd.Name()))
		if line, dup := seen[string(fd.Name())]; dup {
			w.add(key, fp, "given twice (first on line %d); keep one", line)
			continue
		}
		seen[string(fd.Name())] = key.Line
		w.places[fp] = [2]int{val.Line, val.Column}
		w.field(val, fd, fp)
	}
}

func (w *walker) field(n *yaml.Node, fd protoreflect.FieldDescriptor, path string) {
	switch {
	case isNull(n):
	case fd.IsMap():
		if n.Kind != yaml.MappingNode {
			w.add(n, path, "want a mapping of names to values, e.g. %s: {KEY: value}, got %s", fd.Name(), kindWord(n))
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
			w.scalar(k, fd.MapKey(), path)
			ep := path + "." + k.Value
			w.places[ep] = [2]int{v.Line, v.Column}
			w.scalar(v, fd.MapValue(), ep)
		}
	case fd.IsList():
		if n.Kind != yaml.SequenceNode {
			w.add(n, path, "want a list, e.g. %s: [...], got %s", fd.Name(), kindWord(n))
			return
		}
		for i, e := range n.Content {
			e = resolve(e)
			ep := fmt.Sprintf("%s[%d]", path, i)
			w.places[ep] = [2]int{e.Line, e.Column}
			w.value(e, fd, ep)
		}
	default:
		w.value(n, fd, path)
	}
}

// value checks one (non-list) value of fd's type.
func (w *walker) value(n *yaml.Node, fd protoreflect.FieldDescriptor, path string) {
	if fd.Kind() == protoreflect.MessageKind {
		if fd.Message().FullName() == durationName {
			w.duration(n, path)
			return
		}
		w.message(n, fd.Message(), path)
		return
	}
	w.scalar(n, fd, path)
}

func (w *walker) scalar(n *yaml.Node, fd protoreflect.FieldDescriptor, path string) {
	if isNull(n) {
		return
	}
	if n.Kind != yaml.ScalarNode {
		w.add(n, path, "want a single value, got %s", kindWord(n))
		return
	}
	switch fd.Kind() {
	case protoreflect.StringKind:
		// Numbers and booleans where the schema holds text are text.
		n.Tag, n.Style = "!!str", yaml.DoubleQuotedStyle
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind,
		protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		var v int64
		if err := decodeNumber(n, "!!int", &v); err != nil {
			w.add(n, path, "want a whole number, got %q", n.Value)
			return
		}
		if k := fd.Kind(); (k == protoreflect.Int32Kind || k == protoreflect.Sint32Kind || k == protoreflect.Sfixed32Kind) && (v < math.MinInt32 || v > math.MaxInt32) {
			w.add(n, path, "%d is out of range", v)
			return
		}
		n.Tag, n.Value = "!!int", strconv.FormatInt(v, 10)
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind, protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		var v uint64
		if err := decodeNumber(n, "!!int", &v); err != nil {
			w.add(n, path, "want a whole number >= 0, got %q", n.Value)
			return
		}
		n.Tag, n.Value = "!!int", strconv.FormatUint(v, 10)
	case protoreflect.DoubleKind, protoreflect.FloatKind:
		var v float64
		if err := decodeNumber(n, "!!float", &v); err != nil {
			w.add(n, path, "want a number, got %q", n.Value)
			return
		}
		if math.IsInf(v, 0) || math.IsNaN(v) {
			w.add(n, path, "want a finite number, got %q", n.Value)
			return
		}
		n.Tag, n.Value = "!!float", strconv.FormatFloat(v, 'g', -1, 64)
	case protoreflect.BoolKind:
		var v bool
		if err := n.Decode(&v); err != nil {
			w.add(n, path, "want true or false, got %q", n.Value)
		}
	}
}

// decodeNumber reads a number written plainly (tag !!int, or !!float for
// a float) or quoted ("3", as JSON writers sometimes do) into v.
func decodeNumber(n *yaml.Node, tag string, v any) error {
	switch n.Tag {
	case "!!int":
	case "!!float":
		if tag != "!!float" {
			return errNotNumber
		}
	case "!!str":
		// Read the quoted text as if it were written plainly.
		n = &yaml.Node{Kind: yaml.ScalarNode, Value: strings.TrimSpace(n.Value)}
	default:
		return errNotNumber
	}
	return n.Decode(v)
}

var errNotNumber = errors.New("not a number")

// duration accepts Go durations ("30s", "2m", "1h30m") and rewrites them
// as protojson's seconds ("30s", "120s").
func (w *walker) duration(n *yaml.Node, path string) {
	if n.Kind != yaml.ScalarNode {
		w.add(n, path, "want a duration such as \"30s\" or \"2m\", got %s", kindWord(n))
		return
	}
	if n.Tag == "!!int" || n.Tag == "!!float" {
		w.add(n, path, `durations need a unit: write "%ss" for %s seconds`, n.Value, n.Value)
		return
	}
	d, err := time.ParseDuration(strings.TrimSpace(n.Value))
	if err != nil {
		w.add(n, path, "%q is not a duration; write e.g. \"30s\", \"2m\" or \"1h30m\"", n.Value)
		return
	}
	n.Tag, n.Style = "!!str", yaml.DoubleQuotedStyle
	n.Value = strconv.FormatFloat(d.Seconds(), 'f', -1, 64) + "s"
}

func fieldNames(md protoreflect.MessageDescriptor) []string {
	fs := md.Fields()
	out := make([]string, fs.Len())
	for i := range out {
		out[i] = string(fs.Get(i).Name())
	}
	return out
}

// unknownField says what a misspelt or misplaced field name may have meant.
func unknownField(name string, md protoreflect.MessageDescriptor, path string) string {
	msg := fmt.Sprintf("unknown field %q", name)
	if s := closest(name, fieldNames(md)); s != "" {
		return msg + fmt.Sprintf("; did you mean %q?", s)
	}
	// A field of a section written at the wrong level, e.g. command at the top.
	if sec, field := sectionOf(name, md); sec != "" {
		if field == name {
			return msg + fmt.Sprintf("; it belongs in the %s section (%s: {%s: ...})", sec, join(path, sec), field)
		}
		return msg + fmt.Sprintf("; did you mean %q in the %s section (%s: {%s: ...})?", field, sec, join(path, sec), field)
	}
	where := "a spec"
	if path != "" {
		where = path
	}
	return msg + fmt.Sprintf("; %s holds %s", where, strings.Join(fieldNames(md), ", "))
}

// sectionOf finds a section (a message field of md) holding a field named
// name, or failing that one close to it, and returns both names.
func sectionOf(name string, md protoreflect.MessageDescriptor) (section, field string) {
	fs := md.Fields()
	var close, closeSec string
	for i := 0; i < fs.Len(); i++ {
		fd := fs.Get(i)
		if fd.Kind() != protoreflect.MessageKind || fd.IsMap() || fd.Message().FullName() == durationName {
			continue
		}
		if fd.Message().Fields().ByName(protoreflect.Name(name)) != nil {
			return string(fd.Name()), name
		}
		if c := closest(name, fieldNames(fd.Message())); c != "" && close == "" {
			close, closeSec = c, string(fd.Name())
		}
	}
	return closeSec, close
}

// closest returns the candidate nearest to name when it is near enough to
// be a slip (edit distance at most a third of the name, at least 1, or one
// a prefix of the other), "" otherwise.
func closest(name string, candidates []string) string {
	best, bestD := "", 1<<30
	lname := strings.ToLower(name)
	for _, c := range candidates {
		d := editDistance(lname, c)
		if d < bestD {
			best, bestD = c, d
		}
	}
	if best == "" {
		return ""
	}
	limit := max(1, len(name)/3)
	if bestD <= limit {
		return best
	}
	for _, c := range candidates {
		if len(lname) >= 3 && (strings.HasPrefix(c, lname) || strings.HasPrefix(lname, c)) {
			return c
		}
	}
	return ""
}

// editDistance is the Damerau–Levenshtein distance (adjacent swaps count
// one) between a and b.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	d := make([][]int, len(ra)+1)
	for i := range d {
		d[i] = make([]int, len(rb)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(ra); i++ {
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(ra)][len(rb)]
}
