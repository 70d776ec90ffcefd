// Package bytesize is gpumesh's one spelling of a byte size: the parser
// behind every size a user writes (job specs, flags, benchmarks) and the
// formatter behind every size it prints.
//
// Units: B, binary K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) and decimal
// KB, MB, GB, TB (powers of 1000), in any letter case, with optional spaces
// ("40G", "40GiB", "1.5GB", "512 mib", "1024").
package bytesize

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
)

// ErrInvalid is wrapped by every error of Parse.
var ErrInvalid = errors.New("invalid size")

// Max is the largest size Parse accepts (4 EiB).
const Max = 1 << 62

var sizeRE = regexp.MustCompile(`^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$`)

var units = map[string]float64{
	"": 1, "b": 1,
	"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
	"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
	"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
}

// Parse reads a byte size such as "512", "4K", "64MiB", "40G", "1.5GB". The
// result must be a whole number of bytes no larger than Max.
func Parse(s string) (int64, error) {
	m := sizeRE.FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("%w: %q: write a number with an optional unit, e.g. 64MiB or 40GiB", ErrInvalid, s)
	}
	mult, ok := units[strings.ToLower(m[2])]
	if !ok {
		return 0, fmt.Errorf("%w: %q has an unknown unit %q; use B, KiB, MiB, GiB or TiB (binary) or KB, MB, GB, TB (decimal)", ErrInvalid, s, m[2])
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %q: %v", ErrInvalid, s, err)
	}
	b := v * mult
	if b > Max {
		return 0, fmt.Errorf("%w: %q is larger than 4EiB", ErrInvalid, s)
	}
	if b != math.Trunc(b) {
		return 0, fmt.Errorf("%w: %q is not a whole number of bytes", ErrInvalid, s)
	}
	return int64(b), nil
}

// ParseList reads a comma-separated list of sizes ("1MiB, 16MiB,256MiB");
// empty items are skipped.
func ParseList(s string) ([]int64, error) {
	var out []int64
	var errs []error
	for _, p := range strings.Split(s, ",") {
		if strings.TrimSpace(p) == "" {
			continue
		}
		v, err := Parse(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, v)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// Format prints b with the largest binary unit that divides it ("64MiB",
// "1536MiB", "1000B"), which Parse reads back to b. A size that no unit
// divides and that is at least 1KiB is rounded to one decimal ("1.2MiB").
func Format(b int64) string {
	if b < 0 {
		return "-" + Format(-b)
	}
	names := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	u := 0
	for u+1 < len(names) && b >= 1<<(10*(u+1)) {
		u++
	}
	for e := u; e > 0; e-- {
		if b%(1<<(10*e)) == 0 {
			return fmt.Sprintf("%d%s", b>>(10*e), names[e])
		}
	}
	if u == 0 {
		return fmt.Sprintf("%dB", b)
	}
	return fmt.Sprintf("%.1f%s", float64(b)/float64(int64(1)<<(10*u)), names[u])
}
