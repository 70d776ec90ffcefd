"""What the bench scripts that time inside the rank share: the gpumesh
backend object of the default process group, reached on every version of
the Python client that bench/torch/*.sh compare (importing this module
registers the backend, as importing gpumesh.torch does)."""

import torch.distributed as dist

import gpumesh.torch


def gpumesh_backend():
    """The gpumesh backend object of the default group, or None where it
    cannot be reached (older packages have no backend_of: there the group
    is the backend on PyTorch 1.13)."""
    f = getattr(gpumesh.torch, "backend_of", None)
    if f is not None:
        return f()
    g = dist.distributed_c10d._get_default_group()
    return g if hasattr(g, "_conn") else None
