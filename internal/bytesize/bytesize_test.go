package bytesize

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"1": 1, "1024": 1024, "8B": 8, "4K": 4096, "4KiB": 4096, "512KiB": 512 << 10,
		"16M": 16 << 20, "64MiB": 64 << 20, "256mib": 256 << 20, "0.5MiB": 512 << 10,
		"40G": 40 << 30, "40g": 40 << 30, "40GiB": 40 << 30, " 2 GiB ": 2 << 30, "1.5GiB": 3 << 29,
		"1MB": 1e6, "1.5GB": 1.5e9, "2GB": 2e9, "1T": 1 << 40, "1TB": 1e12,
	} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "MiB", "-1", "-1MiB", "1.3B", "abc", "lots", "1XB", "1e99GiB", "9000000TiB", "1..5G"} {
		if _, err := Parse(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("Parse(%q): %v, want ErrInvalid", bad, err)
		}
	}
}

func TestParseList(t *testing.T) {
	got, err := ParseList("1MiB, 16MiB,,256MiB")
	if err != nil || len(got) != 3 || got[0] != 1<<20 || got[2] != 256<<20 {
		t.Fatalf("ParseList = %v, %v", got, err)
	}
	if _, err := ParseList("1MiB,x,2y"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("ParseList with bad items: %v", err)
	}
}

func TestFormat(t *testing.T) {
	for b, want := range map[int64]string{
		0: "0B", 1000: "1000B", 1024: "1KiB", 64 << 20: "64MiB", 3 << 29: "1536MiB",
		80 << 30: "80GiB", 1 << 40: "1TiB", 1234567: "1.2MiB", -2048: "-2KiB",
	} {
		if got := Format(b); got != want {
			t.Errorf("Format(%d) = %q, want %q", b, got, want)
		}
	}
	// Exact sizes read back unchanged.
	for _, b := range []int64{1, 1000, 4096, 3 << 29, 40 << 30, 7 << 40} {
		if got, err := Parse(Format(b)); err != nil || got != b {
			t.Errorf("Parse(Format(%d)) = %d, %v", b, got, err)
		}
	}
}
