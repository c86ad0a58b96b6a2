"""Plain torch.distributed.pipelining over torchrun (gloo), no Ray: the baseline of benchmarks/pipeline_bubble.py.
Run: torchrun --nproc-per-node 2 pp_torchrun.py --schedule 1f1b --microbatches 8  (or --nproc-per-node 1 for the one-stage reference)
The same deep MLP as raybig's benchmark (features -> hidden, then layers - 1 x hidden -> hidden, a head), split as
raybig splits it (the input layer with the first stage, the hidden x hidden layers evenly); prints samples/s and the
bound m/(m+p-1)."""
import argparse, time, torch, torch.nn as nn, torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe, Schedule1F1B

p = argparse.ArgumentParser()
p.add_argument("--schedule", default="1f1b"); p.add_argument("--microbatches", type=int, default=8)
p.add_argument("--features", type=int, default=64); p.add_argument("--hidden", type=int, default=1024)
p.add_argument("--layers", type=int, default=9, help="hidden layers, the first one mapping the features")
p.add_argument("--batch", type=int, default=256); p.add_argument("--steps", type=int, default=30); p.add_argument("--warmup", type=int, default=5)
a = p.parse_args()
torch.set_num_threads(1)
dist.init_process_group("gloo"); rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
blocks = [nn.Sequential(nn.Linear(a.features, a.hidden), nn.ReLU())]
blocks += [nn.Sequential(nn.Linear(a.hidden, a.hidden), nn.ReLU()) for _ in range(a.layers - 1)]
head = nn.Linear(a.hidden, 10)
x = torch.randn(a.batch, a.features); y = torch.randint(0, 10, (a.batch,))
loss_fn = nn.CrossEntropyLoss()
if world == 1:
    model = nn.Sequential(*blocks, head); opt = torch.optim.SGD(model.parameters(), lr=0.01)
    def step():
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
else:
    # the input layer is small: it rides with the first stage, the hidden x hidden layers are shared evenly
    # (raybig's parameter-balanced split gives the same stages for this model)
    per = (a.layers - 1) // world
    start = 0 if rank == 0 else 1 + rank * per
    mine = blocks[start:1 + (rank + 1) * per] + ([head] if rank == world - 1 else [])
    mod = nn.Sequential(*mine); opt = torch.optim.SGD(mod.parameters(), lr=0.01)
    stage = PipelineStage(mod, rank, world, torch.device("cpu"))
    S = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[a.schedule]
    sched = S(stage, n_microbatches=a.microbatches, loss_fn=loss_fn)
    def step():
        opt.zero_grad()
        if rank == 0: sched.step(x)
        elif rank == world - 1: sched.step(target=y, losses=[])
        else: sched.step()
        opt.step()
for i in range(a.warmup + a.steps):
    if i == a.warmup:
        dist.barrier(); t = time.perf_counter()
    step()
dist.barrier(); dt = time.perf_counter() - t
if rank == 0:
    m = a.microbatches
    print(f"pp world={world} schedule={a.schedule if world > 1 else 'none'} m={m} samples_per_s={a.steps * a.batch / dt:.0f} bound={m / (m + world - 1):.3f}")
dist.destroy_process_group()
