package node

import (
	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/cuda"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// gpus is the node's GPU inventory: Config.GPUs, or NVML's.
func (c *Config) gpus(logger hclog.Logger) []*pb.GPU {
	if c.GPUs != nil {
		return c.GPUs()
	}
	return discoverGPUs(logger)
}

// discoverGPUs asks NVML (loaded at run time) for this host's GPUs. A host
// without the NVIDIA driver has none; that is not an error.
func discoverGPUs(logger hclog.Logger) []*pb.GPU {
	infos, err := cuda.Discover()
	if err != nil {
		logger.Info("no GPUs found", "reason", err)
		return nil
	}
	out := make([]*pb.GPU, 0, len(infos))
	for _, g := range infos {
		out = append(out, &pb.GPU{Index: int32(g.Index), Model: g.Model, MemoryBytes: g.MemoryBytes, Uuid: g.UUID})
	}
	if len(out) > 0 {
		logger.Info("GPUs found", "count", len(out), "model", out[0].Model)
	}
	return out
}
