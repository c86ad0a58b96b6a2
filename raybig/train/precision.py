"""train.precision: autocast for bf16 and fp16, and fp16's dynamic loss scaling, the same for every layout."""
from __future__ import annotations

import torch
import torch.distributed as dist

from raybig.train.parallel import local_part

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """What a layout needs of train.precision: `autocast()` around a forward, `scale(loss)` before a backward
    (inside a pipeline schedule too); the loop calls `unscale(params)` before the optimizer step.

    fp16's narrow range underflows small gradients: the loss is multiplied by a scale before backward, the
    gradients divided by it after, and a step whose gradients overflowed anywhere is skipped on every rank
    (one all-reduce of a flag: the ranks must agree) and halves the scale; `growth_interval` steps in a row
    without overflow double it (torch.amp.GradScaler's rule, which does not reach DTensor shards or pipeline
    schedules). Reading the flag is a host sync per step: fp16 only."""

    def __init__(self, name: str, device: torch.device, scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.name, self.device, self.dtype = name, device, DTYPES[name]
        self.scaling = name == "fp16"
        self.value, self.growth_interval, self.good_steps = scale, growth_interval, 0
        self.skipped = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.name != "fp32")

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.value if self.scaling else loss

    def unscaled(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss that went through `scale`, back to its value."""
        return loss / self.value if self.scaling else loss

    def unscale(self, params: list[torch.nn.Parameter]) -> bool:
        """Gradients back to their true size; False when they overflowed on any rank (skip this step)."""
        if not self.scaling:
            return True
        grads = [local_part(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.value)
            overflow = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float()
        else:
            overflow = torch.zeros((), device=self.device)
        if dist.is_initialized():
            overflow = overflow.to(self.device)
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
        if overflow.item():
            self.value, self.good_steps, self.skipped = self.value / 2, 0, self.skipped + 1
            for p in params:
                p.grad = None
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.value, self.good_steps = self.value * 2, 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.value, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.good_steps = state["scale"], state["good_steps"]
        self.skipped = state.get("skipped", 0)
