package collective

import (
	"fmt"
	"strings"
)

// DType is the element type of a Buffer.
type DType uint8

// Element types. The zero value is invalid so that an uninitialised header or
// spec is caught.
const (
	Float32 DType = iota + 1
	Float64
	Float16
	BFloat16
	Int32
	Int64
	Uint8
	dtypeEnd
)

var dtypeNames = [...]string{"invalid", "float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8"}
var dtypeSizes = [...]int{0, 4, 8, 2, 2, 4, 8, 1}

// AllDTypes lists every supported element type.
var AllDTypes = []DType{Float32, Float64, Float16, BFloat16, Int32, Int64, Uint8}

// Valid reports whether d is a supported element type.
func (d DType) Valid() bool { return d > 0 && d < dtypeEnd }

// Size is the size of one element in bytes (0 for an invalid DType).
func (d DType) Size() int {
	if !d.Valid() {
		return 0
	}
	return dtypeSizes[d]
}

// IsFloat reports whether d is a floating-point type.
func (d DType) IsFloat() bool { return d == Float32 || d == Float64 || d == Float16 || d == BFloat16 }

func (d DType) String() string {
	if !d.Valid() {
		return fmt.Sprintf("dtype(%d)", uint8(d))
	}
	return dtypeNames[d]
}

// MarshalText makes DType readable in JSON.
func (d DType) MarshalText() ([]byte, error) {
	if !d.Valid() {
		return nil, fmt.Errorf("%w: %d", ErrBadDType, uint8(d))
	}
	return []byte(d.String()), nil
}

// UnmarshalText parses the names ParseDType accepts.
func (d *DType) UnmarshalText(b []byte) error {
	v, err := ParseDType(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// ParseDType parses "float32", "fp32", "f32", "float16", "fp16", "half",
// "bfloat16", "bf16", "float64", "fp64", "double", "int32", "int64", "uint8".
func ParseDType(s string) (DType, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "float32", "fp32", "f32", "float":
		return Float32, nil
	case "float64", "fp64", "f64", "double":
		return Float64, nil
	case "float16", "fp16", "f16", "half":
		return Float16, nil
	case "bfloat16", "bf16":
		return BFloat16, nil
	case "int32", "i32", "int":
		return Int32, nil
	case "int64", "i64", "long":
		return Int64, nil
	case "uint8", "u8", "byte":
		return Uint8, nil
	}
	return 0, fmt.Errorf("%w: %q (want one of float32, float64, float16, bfloat16, int32, int64, uint8)", ErrBadDType, s)
}

// Op is a reduction operator.
type Op uint8

// Reduction operators. OpAvg sums and then divides by the number of ranks
// (integer types divide with truncation toward zero).
const (
	OpSum Op = iota + 1
	OpAvg
	OpMax
	OpMin
	OpProd
	opEnd
)

var opNames = [...]string{"invalid", "sum", "avg", "max", "min", "prod"}

// AllOps lists every reduction operator.
var AllOps = []Op{OpSum, OpAvg, OpMax, OpMin, OpProd}

// Valid reports whether o is a supported operator.
func (o Op) Valid() bool { return o > 0 && o < opEnd }

func (o Op) String() string {
	if !o.Valid() {
		return fmt.Sprintf("op(%d)", uint8(o))
	}
	return opNames[o]
}

// ParseOp parses "sum", "avg", "max", "min", "prod".
func ParseOp(s string) (Op, error) {
	for i := 1; i < int(opEnd); i++ {
		if strings.EqualFold(strings.TrimSpace(s), opNames[i]) {
			return Op(i), nil
		}
	}
	return 0, fmt.Errorf("%w: %q (want sum, avg, max, min or prod)", ErrBadOp, s)
}
