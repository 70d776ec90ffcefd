"""A script written the way torchrun scripts are: it reads the environment
torchrun sets and meets its peers at MASTER_ADDR:MASTER_PORT (rank 0 listens
there, as torch.distributed's TCPStore does). With PyTorch installed it also
runs a gloo all-reduce through init_process_group("env://")."""
import os
import socket
import sys
import time

rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
local_rank = int(os.environ["LOCAL_RANK"])
local_world = int(os.environ["LOCAL_WORLD_SIZE"])
master = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
restarts = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
print(f"rank {rank}/{world} local {local_rank}/{local_world} master {master[0]}:{master[1]} restarts {restarts}", flush=True)

try:
    import torch
    import torch.distributed as dist
except ImportError:
    torch = None

if torch is not None:
    dist.init_process_group("gloo", init_method="env://")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2, t
    print(f"torch all_reduce ok: {t.item()}", flush=True)
    dist.destroy_process_group()
    sys.exit(0)

# Without PyTorch: a TCP rendezvous at the master address, the same contract.
deadline = time.time() + 60
if rank == 0:
    srv = socket.create_server(master, reuse_port=False)
    srv.settimeout(60)
    got = set()
    conns = []
    while len(got) < world - 1:
        c, _ = srv.accept()
        got.add(int(c.recv(16).decode().strip()))
        conns.append(c)
    for c in conns:
        c.sendall(f"{sorted(got)}\n".encode())
        c.close()
    print(f"rendezvous ok: ranks {sorted(got | {0})}", flush=True)
else:
    while True:
        try:
            c = socket.create_connection(master, timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    c.sendall(f"{rank}\n".encode())
    print(f"rendezvous ok: {c.recv(256).decode().strip()}", flush=True)
