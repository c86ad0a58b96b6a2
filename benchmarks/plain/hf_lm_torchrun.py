"""The plain baselines of benchmarks/hf_lm.py, under `torchrun --nproc-per-node 2` (no Ray):
  plain:   a DDP loop over transformers' model and loss;
  trainer: the Hugging Face Trainer, launched the way its docs say (torchrun runs the script).
Both read the same tokens and config as the raybig run (written by hf_lm.py) and print tokens/s (rank 0).
Run: torchrun --nproc-per-node 2 hf_lm_torchrun.py plain|trainer DIR --steps N --warmup W"""
import argparse, json, os, tempfile, time
import numpy as np, torch, torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("mode", choices=["plain", "trainer"]); p.add_argument("dir")
p.add_argument("--steps", type=int, default=60); p.add_argument("--warmup", type=int, default=5)
p.add_argument("--batch", type=int, default=16); p.add_argument("--lr", type=float, default=1e-3)
a = p.parse_args()
torch.set_num_threads(1)
x, y = (torch.from_numpy(np.load(os.path.join(a.dir, f"{n}.npy"))) for n in ("x", "y"))
config = AutoConfig.for_model(**json.load(open(os.path.join(a.dir, "config.json"))))
seq = x.shape[1]
total = a.warmup + a.steps
assert len(x) >= total * a.batch, "not enough windows for the steps asked"

if a.mode == "plain":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(AutoModelForCausalLM.from_config(config))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, foreach=True)
    local = a.batch // world
    for step in range(total):
        if step == a.warmup:
            dist.barrier(); t0 = time.perf_counter()
        lo = step * a.batch + rank * local
        loss = model(input_ids=x[lo:lo + local], labels=y[lo:lo + local], shift_labels=y[lo:lo + local]).loss
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    dist.barrier(); dt = time.perf_counter() - t0
    if rank == 0:
        print(f"tokens_per_s={a.steps * a.batch * seq / dt:.0f}")
    dist.destroy_process_group()
else:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    world = int(os.environ.get("WORLD_SIZE", 1))

    class Windows(torch.utils.data.Dataset):
        def __len__(self): return total * a.batch
        def __getitem__(self, i): return {"input_ids": x[i], "labels": x[i]}  # the Trainer's model shifts

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.warmup: self.t0 = time.perf_counter()
        def on_train_end(self, args, state, control, **kw):
            if args.process_index == 0:
                print(f"tokens_per_s={a.steps * a.batch * seq / (time.perf_counter() - self.t0):.0f}")

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch // world,
                             max_steps=total, learning_rate=a.lr, weight_decay=0.0, lr_scheduler_type="constant",
                             logging_steps=10_000, save_strategy="no", report_to=[], dataloader_num_workers=0,
                             use_cpu=True, ddp_backend="gloo", disable_tqdm=True)
    Trainer(model=AutoModelForCausalLM.from_config(config), args=args, train_dataset=Windows(),
            callbacks=[Clock()]).train()
