// Package ddpout reads what examples/ddp/train.py writes with --out: one
// file per rank, OUT/rank<r>.json, with the rank's per-step losses and its
// final parameters. `gpumesh dev --demo` and node's PyTorch tests check a
// DDP run with it.
package ddpout

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// RankOutput is one rank's file.
type RankOutput struct {
	Rank   int       `json:"rank"`
	World  int       `json:"world"`
	Losses []float64 `json:"losses"`
	Params []float64 `json:"params"`
}

// Read reads the files of ranks 0..ranks-1 from dir; an error names the
// rank whose file is missing or malformed.
func Read(dir string, ranks int) ([]RankOutput, error) {
	out := make([]RankOutput, ranks)
	for r := range out {
		b, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("rank%d.json", r)))
		if err == nil {
			err = json.Unmarshal(b, &out[r])
		}
		if err != nil {
			return nil, fmt.Errorf("rank %d's output: %w", r, err)
		}
	}
	return out, nil
}
