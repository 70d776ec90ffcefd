package cuda

import (
	"errors"
	"testing"
)

func TestDTypeSizesAndNames(t *testing.T) {
	want := map[DType]struct {
		size int
		name string
	}{
		Float32: {4, "float32"}, Float64: {8, "float64"}, Float16: {2, "float16"},
		BFloat16: {2, "bfloat16"}, Int32: {4, "int32"}, Int64: {8, "int64"}, Uint8: {1, "uint8"},
	}
	for _, dt := range AllDTypes() {
		w, ok := want[dt]
		if !ok {
			t.Fatalf("dtype %v not in the table", dt)
		}
		if dt.Size() != w.size || dt.String() != w.name {
			t.Errorf("%v: size %d name %q, want %d %q", dt, dt.Size(), dt.String(), w.size, w.name)
		}
	}
	if DType(99).Size() != 0 {
		t.Error("unknown dtype has a size")
	}
}

func TestOpKernelNames(t *testing.T) {
	for op, want := range map[Op]string{Sum: "sum", Avg: "sum", Prod: "prod", Max: "max", Min: "min"} {
		got, err := op.kernelOp()
		if err != nil || got != want {
			t.Errorf("%v: kernel %q err %v, want %q", op, got, err, want)
		}
	}
	if _, err := Op(42).kernelOp(); !errors.Is(err, ErrUnsupported) {
		t.Errorf("unknown op: err %v, want ErrUnsupported", err)
	}
}

func TestConfigValidate(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("default config: %v", err)
	}
	bad := []Config{
		{PinnedSlotBytes: 0, PinnedSlots: 1},
		{PinnedSlotBytes: 4097, PinnedSlots: 1},
		{PinnedSlotBytes: 4096, PinnedSlots: 0},
		{PinnedSlotBytes: 4096, PinnedSlots: 1, Devices: []int{-1}},
		{PinnedSlotBytes: 4096, PinnedSlots: 1, Devices: []int{0, 0}},
	}
	for i, c := range bad {
		if err := c.Validate(); !errors.Is(err, ErrBadArgument) {
			t.Errorf("case %d: err %v, want ErrBadArgument", i, err)
		}
	}
}
