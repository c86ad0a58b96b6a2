"""The plain alternatives to `raybig run jobs/digits_mlp.yaml --set train.epochs=2`: the same MLP (64-256-128-10,
dropout 0.1), Adam at 2e-3, global batch 64, two data-parallel ranks over the same 8x8 digits split, an
evaluation after each epoch; under `torchrun` (mode `torchrun`) or inside a raw Ray Train TorchTrainer on an
embedded Ray (mode `raytrain`). Prints `train_s=` (the epochs themselves, evaluation included) for
benchmarks/startup.py, which times the whole command around it.

    torchrun --nproc-per-node 2 benchmarks/plain/digits_mlp.py torchrun
    python benchmarks/plain/digits_mlp.py raytrain
"""
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

EPOCHS, BATCH, LR = 2, 64, 2e-3


def train(rank: int, world: int, ddp) -> float:
    torch.set_num_threads(1)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_val, y_train, y_val = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                                      stratify=digits.target)
    torch.manual_seed(0)
    model = ddp(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 128), nn.ReLU(),
                              nn.Dropout(0.1), nn.Linear(128, 10)))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val)
    local = BATCH // world
    started = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i + rank * local:i + (rank + 1) * local]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            mine = slice(rank, None, world)
            correct = torch.tensor([(model(xv[mine]).argmax(-1) == yv[mine]).sum().item()], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(correct)
        if rank == 0:
            print(f"epoch {epoch + 1} val_accuracy {correct.item() / len(yv):.4f}", flush=True)
    return time.perf_counter() - started


def torchrun_main() -> None:
    import os

    dist.init_process_group("gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    seconds = train(rank, world, nn.parallel.DistributedDataParallel)
    if rank == 0:
        print(f"train_s={seconds:.3f}")
    dist.barrier()  # neither rank tears gloo down under the other (which then aborted at exit)
    dist.destroy_process_group()


def raytrain_main() -> None:
    import tempfile

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer, prepare_model

    def loop(_):
        import json
        import os

        ctx = ray.train.get_context()
        seconds = train(ctx.get_world_rank(), ctx.get_world_size(), prepare_model)
        with tempfile.TemporaryDirectory() as d:  # Ray Train keeps the metrics reported with a checkpoint
            checkpoint = None
            if ctx.get_world_rank() == 0:
                json.dump({"train_s": seconds}, open(os.path.join(d, "m.json"), "w"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"train_s": seconds}, checkpoint=checkpoint)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    result = TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2),
                          run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="digits-raytrain-"))).fit()
    print(f"train_s={result.metrics['train_s']:.3f}")
    ray.shutdown()


if __name__ == "__main__":
    {"torchrun": torchrun_main, "raytrain": raytrain_main}[sys.argv[1]]()
