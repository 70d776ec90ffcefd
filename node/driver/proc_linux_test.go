package driver

import "testing"

func TestParseProcStat(t *testing.T) {
	line := "4242 (a (weird) name) S 1 4240 4239 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615\n"
	st, err := parseProcStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if st.State != 'S' || st.Pgrp != 4240 || st.Session != 4239 || st.Start != 987654 {
		t.Fatalf("got %+v", st)
	}
	if _, err := parseProcStat([]byte("12 (x) S 1")); err == nil {
		t.Fatal("short line accepted")
	}
}
