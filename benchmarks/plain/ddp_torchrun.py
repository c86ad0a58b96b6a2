"""Plain torch DDP, no Ray: the baseline of benchmarks/ddp_overhead.py.
Run: torchrun --nproc-per-node 2 ddp_torchrun.py [--hidden 1024] [--batch 256] [--steps 200]; prints samples/s (rank 0)."""
import argparse, os, time, torch, torch.nn as nn, torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=1024); p.add_argument("--batch", type=int, default=256)
p.add_argument("--steps", type=int, default=200); p.add_argument("--warmup", type=int, default=20)
a = p.parse_args()
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, a.hidden), nn.ReLU(), nn.Linear(a.hidden, a.hidden), nn.ReLU(), nn.Linear(a.hidden, 10))
ddp = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
local = a.batch // world
g = torch.Generator().manual_seed(rank)
x = torch.randn(local, 64, generator=g); y = torch.randint(0, 10, (local,), generator=g)
for i in range(a.warmup + a.steps):
    if i == a.warmup:
        dist.barrier(); t = time.perf_counter()
    loss = nn.functional.cross_entropy(ddp(x), y); opt.zero_grad(); loss.backward(); opt.step()
dist.barrier(); dt = time.perf_counter() - t
if rank == 0:
    print(f"torchrun_ddp world={world} hidden={a.hidden} batch={a.batch} samples_per_s={a.steps * a.batch / dt:.0f}")
dist.destroy_process_group()
