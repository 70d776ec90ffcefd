"""gpumesh.checkpoint against the agent's local API alone (one rank, no
process group): save, latest, load (mapped), a manifest too large for one
packet, and the load of an older step."""

import torch

from gpumesh import checkpoint as ckpt

state, step = ckpt.load()
assert state is None and step == -1, (state, step)

first = {"w": torch.arange(3_000_000, dtype=torch.float32), "h": torch.randn(5).half(),
         "opt": {"lr": 0.1, "steps": [1, 2, 3]}, "empty": torch.empty(0)}
first["alias"] = first["w"][10:20]
ckpt.save(first, 7, meta={"big": "m" * 65500})  # the commit's body goes in a memfd
m = ckpt.latest()  # and so does this reply
assert m["step"] == 7 and m["meta"]["big"] == "m" * 65500 and m["job"] == "j", {k: m[k] for k in ("step", "job")}
assert set(ckpt.last_save) == {"write_seconds", "store_seconds", "commit_seconds"}, ckpt.last_save

second = {"w": torch.ones(10)}
ckpt.save(second, 9)

got, step = ckpt.load()
assert step == 9 and torch.equal(got["w"], second["w"]), step
assert ckpt.last_load["load"] == "mmap", ckpt.last_load

got, step = ckpt.load(step=7)
assert step == 7
for k in ("w", "h", "empty", "alias"):
    assert got[k].dtype == first[k].dtype and torch.equal(got[k], first[k]), k
assert got["opt"] == first["opt"]
assert got["alias"].data_ptr() == got["w"].data_ptr() + 10 * 4, "a view lost its storage"
got["w"].add_(1)  # a private mapping: the stored part is unchanged
again, _ = ckpt.load(step=7)
assert torch.equal(again["w"], first["w"])
print("checkpoint ok", flush=True)
