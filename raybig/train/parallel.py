"""Parallelism applied from outside the model, in torchtitan's order: lay out the (dp, pp, tp) mesh, split
each block's layers over the tensor-parallel ranks, checkpoint and compile blocks, split the model into
stages, shard or replicate each over the data-parallel ranks, then build the pipeline schedule.

The training loop sees one object, a `Layout`, whatever the degrees: it asks it to run a forward and
backward pass on a batch, to run a forward pass for evaluation, and for this rank's share of the weights.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from raybig.models.parts import NoParts, Part, model_parts
from raybig.train.activations import checkpoint_blocks

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


# ----------------------------------------------------------------------------- the mesh
@dataclass(frozen=True)
class Mesh:
    """Where a rank sits in the (dp, pp, tp) grid; rank = (dp_index * pp + pp_index) * tp + tp_index, so a
    tensor-parallel group (which talks most) is the nearest ranks, on one host where a host has several."""
    dp: int
    pp: int
    rank: int
    tp: int = 1

    @property
    def dp_index(self) -> int:
        return self.rank // (self.pp * self.tp)

    @property
    def pp_index(self) -> int:
        return self.rank // self.tp % self.pp

    @property
    def tp_index(self) -> int:
        return self.rank % self.tp

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp


def device_mesh(mesh: Mesh):
    """The named (dp, pp, tp) DeviceMesh of the run; None where there is no process group."""
    if mesh.world == 1 or not dist.is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (mesh.dp, mesh.pp, mesh.tp), mesh_dim_names=("dp", "pp", "tp"))


def process_groups(mesh: Mesh, named):
    """The (dp, pp) sub-groups of the named mesh; None where the degree is 1 or there is no process group."""
    if named is None:
        return None, None
    dp_group = named["dp"].get_group() if mesh.dp > 1 else None
    pp_group = named["pp"].get_group() if mesh.pp > 1 else None
    return dp_group, pp_group


# ----------------------------------------------------------------------------- splitting into stages
def balanced_split(sizes: list[int], parts: int) -> list[int]:
    """Start indices of `parts` contiguous groups of `sizes` that minimise the largest group's sum."""
    n = len(sizes)
    if parts > n:
        raise ValueError(f"cannot split {n} blocks into {parts} stages")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][i]: the smallest possible largest part when the first i blocks form k parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def stage_starts(parts: list[Part], stages: int, split_points: list[int] | None) -> list[int]:
    """Explicit split points (part indices where stages 2, 3, ... begin), or balanced by parameter count."""
    if split_points:
        return [0, *split_points]
    return balanced_split([part.parameters or 1 for part in parts], stages)


def describe_stages(parts: list[Part], pipeline_spec) -> list[str]:
    """One line per stage: its parts and parameter count, as `raybig validate` shows them."""
    starts = stage_starts(parts, pipeline_spec.total_stages, pipeline_spec.split_points)
    ends = [*starts[1:], len(parts)]
    lines = []
    for i, (a, b) in enumerate(zip(starts, ends)):
        params = sum(part.parameters for part in parts[a:b])
        kinds = ", ".join(part.name for part in parts[a:b])
        lines.append(f"stage {i} (rank {i % pipeline_spec.stages}): parts {a}..{b - 1} [{kinds}], {params:,} parameters")
    return lines


class Stage(nn.Module):
    """A run of consecutive parts. Its modules sit at their paths in the full model (blocks.3, model.layers.3),
    so parameter names are the full model's and the stages' state dicts merge back with no renaming."""

    def __init__(self, parts: list[Part]):
        super().__init__()
        self._runs = [part.run for part in parts]
        for part in parts:
            for path, module in part.modules.items():
                _attach(self, path, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for run in self._runs:
            x = run(x)
        return x


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if name not in node._modules:
            node.add_module(name, nn.Module())
        node = node._modules[name]
    if leaf not in node._modules:
        node.add_module(leaf, module)


def split_parts(parts: list[Part], starts: list[int]) -> list[list[Part]]:
    """The parts of each stage, from the indices where stages begin."""
    ends = [*starts[1:], len(parts)]
    return [parts[a:b] for a, b in zip(starts, ends)]


def split_model(parts: list[Part], starts: list[int]) -> list[Stage]:
    return [Stage(group) for group in split_parts(parts, starts)]


# ----------------------------------------------------------------------------- layouts
def _place(layout, mesh: Mesh) -> None:
    """What the loop asks of every layout about this rank's place, once its modules are set."""
    layout.writes_part = mesh.dp_index == 0 and mesh.tp_index == 0  # one writer per stage
    layout.reports = layout.holds_output and mesh.tp_index == 0  # tensor-parallel ranks share one output
    layout.sharded = dist.is_initialized() and any(
        isinstance(p, DTensor) for module in layout.local for p in module.parameters())
    # what the optimizer's state is keyed against (by parameter name) where it is gathered
    layout.root = layout.local[0] if len(layout.local) == 1 else nn.ModuleList(layout.local)


class DataParallel:
    """The whole model (or its tensor-parallel shard) on every rank. Gradients are averaged over the dp ranks
    by DDP, or by hand with tensor-parallel shards, which DDP does not take. With grad_accumulation k, a
    batch runs as k microbatches and gradients are averaged over the ranks once, after the last."""
    def __init__(self, model: nn.Module, mesh: Mesh, dp_group, device: torch.device, loss_fn, precision,
                 accumulation: int = 1):
        self.mesh, self.loss_fn, self.precision, self.accumulation = mesh, loss_fn, precision, accumulation
        self.device, self.local, self.stage_ids, self.pp_group = device, [model], [0], None
        self.holds_output = True
        self.model = self.eval_model = model  # evaluating the bare module: no gradient sync to set up
        self.average_over = None
        if dp_group is not None and mesh.tp > 1:
            self.average_over = dp_group
        elif dp_group is not None:
            self.model = DistributedDataParallel(
                model, process_group=dp_group, device_ids=[device] if device.type == "cuda" else None,
                broadcast_buffers=False)
        self.collective_forward = mesh.tp > 1 and dist.is_initialized()
        _place(self, mesh)

    def train_step(self, x, y) -> torch.Tensor:
        k, total = self.accumulation, 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k))):
            with self._sync(last=i == k - 1):
                with self.precision.autocast():
                    loss = self.loss_fn(self.model(xs), ys)
                # each microbatch's loss is its mean: their mean is the whole batch's
                self.precision.scale(loss / k if k > 1 else loss).backward()
            total = total + loss.detach()
        if self.average_over is not None:
            average_gradients(parameters(self), self.average_over)
        return total / k if k > 1 else total

    def _sync(self, last: bool):
        if not last and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return nullcontext()

    @torch.no_grad()
    def forward(self, x, y) -> torch.Tensor:
        with self.precision.autocast():
            return self.eval_model(x)


class ShardedDataParallel(DataParallel):
    """FSDP2: each block's parameters (and the rest, at the root) sharded over the dp ranks; a forward
    all-gathers a block's parameters just before it runs, and backward reduce-scatters its gradients, averaged
    over the ranks as DDP's are. Every rank must run every forward: evaluation keeps the ranks in step."""

    def __init__(self, model: nn.Module, parts: list[Part] | None, mesh: Mesh, named_mesh, device: torch.device,
                 loss_fn, precision, accumulation: int = 1):
        super().__init__(model, mesh, None, device, loss_fn, precision, accumulation)  # sharded in place, no DDP
        self.collective_forward = dist.is_initialized()
        if named_mesh is not None and mesh.dp > 1:
            shard(parts, model, named_mesh["dp"], precision)  # fully_shard moves each shard to the mesh's device
        else:  # nothing to shard over
            model.to(device)
        _place(self, mesh)

    def _sync(self, last: bool):
        if self.accumulation > 1 and isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(last)  # no reduce-scatter until the last microbatch
        return nullcontext()


def shard(parts: list[Part] | None, root: nn.Module, dp_mesh, precision) -> None:
    """FSDP2 units, torchtitan's way: each block, then the rest at `root`. Below fp32, parameters are
    all-gathered in the training precision and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {"mesh": dp_mesh}
    if precision.name != "fp32":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    for part in parts or []:
        if part.block:
            fully_shard(next(iter(part.modules.values())), **options)
    fully_shard(root, **options)


class Pipeline:
    """This rank's stage(s) of the model, driven by a torch schedule; over the dp ranks each stage is
    sharded (FSDP2) or its gradients averaged after the schedule's step."""

    def __init__(self, parts: list[Part], mesh: Mesh, named_mesh, device: torch.device, loss_fn, precision,
                 pipeline_spec, data_mode: str = "ddp"):
        from torch.distributed import pipelining

        self.mesh, self.loss_fn, self.precision, self.device = mesh, loss_fn, precision, device
        dp_group, self.pp_group = process_groups(mesh, named_mesh)
        self.sample = None  # a training sample's input and target: what short evaluation batches are padded with
        virtual = pipeline_spec.virtual_stages if pipeline_spec.schedule == "interleaved_1f1b" else 1
        total = mesh.pp * virtual
        stage_parts = split_parts(parts, stage_starts(parts, total, pipeline_spec.split_points))
        # interleaved: rank r holds stages r, r + pp, r + 2 pp, ... (torch's convention)
        self.stage_ids = list(range(mesh.pp_index, total, mesh.pp))
        self.local = [Stage(stage_parts[i]).to(device) for i in self.stage_ids]
        sharded = data_mode == "fsdp" and named_mesh is not None and mesh.dp > 1
        if sharded:  # torch's stages drive FSDP themselves: gradients reduce-scatter after the last microbatch
            for i, stage in zip(self.stage_ids, self.local):
                shard(stage_parts[i], stage, named_mesh["dp"], precision)
        self.holds_output = (total - 1) in self.stage_ids
        self.holds_input = 0 in self.stage_ids
        self.collective_forward = sharded or mesh.tp > 1
        # Unsharded, gradients are averaged over the dp group after the schedule step (see train_step), not by
        # DDP: DDP's reducer, under the schedule's per-microbatch no_sync, rebuilt its buckets wrongly in
        # torch 2.13 (an internal assert, or silently unsynchronised replicas with static_graph).
        self.dp_group = None if sharded else dp_group
        schedule_cls = getattr(pipelining, SCHEDULES[pipeline_spec.schedule])

        def schedule():
            stages = [pipelining.PipelineStage(s, i, total, device, group=self.pp_group)
                      for s, i in zip(self.local, self.stage_ids)]
            return schedule_cls(stages if virtual > 1 else stages[0], n_microbatches=pipeline_spec.microbatches,
                                loss_fn=self._microbatch_loss, scale_grads=True)

        # scale_grads: the loss is a per-microbatch mean, so gradients are averaged over microbatches,
        # which makes a step the same as one over the whole batch.
        self.schedule = schedule()
        # Evaluation gets its own stages and schedule over the same modules. A torch schedule that switches
        # between eval() and step() redoes its set-up (P2P warm-up, shape inference through every stage) on
        # each switch, which cost the first training step of every epoch 0.3-0.6 s here.
        self.eval_schedule = schedule()
        _place(self, mesh)

    def _microbatch_loss(self, outputs, targets):
        return self.precision.scale(self.loss_fn(outputs, targets))

    def _args(self, x, y) -> tuple[tuple, dict]:
        kwargs = {"target": y, "losses": []} if self.holds_output else {}
        return ((x,) if self.holds_input else ()), kwargs

    def train_step(self, x, y) -> torch.Tensor | None:
        if self.sample is None:
            self.sample = (x[:1].detach(), y[:1].detach(), len(x))
        args, kwargs = self._args(x, y)
        with self.precision.autocast():
            self.schedule.step(*args, **kwargs)
        if self.dp_group is not None:
            average_gradients(parameters(self), self.dp_group)
        if self.holds_output:
            losses = torch.stack([loss.detach().float() for loss in kwargs["losses"]]).mean()
            return self.precision.unscaled(losses)
        return None

    @torch.no_grad()
    def forward(self, x, y) -> torch.Tensor | None:
        """The stages were shaped by the training batch: pad a short evaluation batch up to it (an empty one,
        which a sharded stage runs to keep its dp peers in step, with a training sample)."""
        n = len(x)
        batch = self.sample[2] if self.sample is not None else n
        if n == 0:
            x, y = (t.expand(batch, *t.shape[1:]) for t in self.sample[:2])
        elif n < batch:
            x, y = (torch.cat([t, t[:1].expand(batch - n, *t.shape[1:])]) for t in (x, y))
        args, kwargs = self._args(x, y)
        with self.precision.autocast():
            out = self.eval_schedule.eval(*args, **kwargs)
        return out[:n] if self.holds_output else None


def average_gradients(params: list[nn.Parameter], group) -> None:
    """One all-reduce of all gradients (this rank's shards of tensor-parallel ones), flattened, then divided by
    the group size."""
    grads = [local_part(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def parallelize(model: nn.Module, spec, env, loss_fn, precision):
    """torchtitan's order: tensor parallelism, activation checkpointing and compilation per block, then the
    data-parallel or pipeline layout around them."""
    p, t = spec.parallelism, spec.train
    mesh = Mesh(p.data, p.pipeline.stages, env.rank, p.tensor)
    named = device_mesh(mesh) if env.distributed else None
    blocks_name = getattr(spec.model, "blocks", None)
    if mesh.tp > 1 and named is not None:
        from raybig.train.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, named["tp"])
    if t.activation_checkpointing != "none":
        checkpoint_blocks(model_parts(model, blocks_name), t.activation_checkpointing)
    if t.compile == "blocks":
        compile_blocks(model_parts(model, blocks_name))
    if mesh.pp > 1:
        layout = Pipeline(model_parts(model, blocks_name), mesh, named, env.device, loss_fn, precision, p.pipeline,
                          p.data_mode)
    elif p.data_mode == "fsdp":
        layout = ShardedDataParallel(model, parts_or_none(model, blocks_name), mesh, named, env.device, loss_fn,
                                     precision, t.grad_accumulation)
    else:
        dp_group, _ = process_groups(mesh, named)
        layout = DataParallel(model.to(env.device), mesh, dp_group, env.device, loss_fn, precision,
                              t.grad_accumulation)
    if t.compile == "model":
        for module in layout.local:
            module.compile()  # in place: parameter names, DDP's hold on the module and checkpoints are unchanged
    return layout


def parts_or_none(model: nn.Module, blocks_name: str | None) -> list[Part] | None:
    """The model's parts where it has them: FSDP shards per block when it can, the whole model otherwise."""
    try:
        return model_parts(model, blocks_name)
    except NoParts:
        return None


def compile_blocks(parts: list[Part]) -> None:
    """Each repeated block compiled on its own (its first module: a decoder layer, not the rotary embedding it
    shares), in place; embeddings and heads stay eager."""
    for part in parts:
        if part.block:
            next(iter(part.modules.values())).compile()


def state_dict(layout) -> dict[str, torch.Tensor]:
    """This rank's checkpointed tensors under the full model's names: everything but the frozen base model
    under LoRA adapters, which the model's builder makes again from its seed or directory. In a sharded
    layout, its shards (DTensors), which torch.distributed.checkpoint writes without gathering them."""
    out = {}
    for module in layout.local:
        state = module.state_dict()
        out.update({k: state[k] for k in checkpointed_keys(module) if k in state})
    return out


def sharded_optimizer_state(layout, optimizer) -> dict:
    """This rank's shards of the optimizer state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(layout.root, optimizer)


def load_sharded_optimizer_state(layout, optimizer, directory) -> None:
    """The optimizer state from its shards in `directory`, resharded to this layout (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = {"optimizer": sharded_optimizer_state(layout, optimizer)}  # the shapes to read into
    dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(layout.root, optimizer, optim_state_dict=state["optimizer"])


def checkpointed_keys(module: nn.Module) -> list[str]:
    """A LoRA model's frozen base is made again by its builder and stays out; weights frozen by fine-tuning
    (init_from) came from elsewhere and go in."""
    if not any(getattr(m, "raybig_rebuilds_frozen", False) for m in module.modules()):
        return list(module.state_dict())
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return [k for k in module.state_dict() if k not in frozen]


def load_optimizer_state(layout, optimizer, state: dict) -> None:
    """A whole optimizer state from a checkpoint: an unsharded layout's own, or, for a sharded layout, one
    gathered by parameter name (how sharded runs checkpointed before they wrote shards)."""
    if not layout.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(layout.root, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_state(layout, full_state: dict[str, torch.Tensor]) -> None:
    for module in layout.local:
        wanted = {k: full_state[k] for k in checkpointed_keys(module)}
        if layout.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # every rank read the whole checkpoint; each keeps its shard of it
            set_model_state_dict(module, wanted, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            module.load_state_dict(wanted, strict=False)


def parameters(layout) -> list[nn.Parameter]:
    """The parameters this rank trains."""
    return [p for module in layout.local for p in module.parameters() if p.requires_grad]


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_numel(param: torch.Tensor) -> int:
    """The elements of `param` this rank holds: its shard under FSDP or tensor parallelism."""
    return local_part(param).numel()


def squared_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The squared norm of the whole of `tensors`, some of which may be shards (DTensors): each rank's sum of
    squares, summed over the mesh dimensions a tensor is sharded along (one all-reduce per group of tensors
    sharded alike); replicated and plain tensors are counted once."""
    groups: dict[tuple, torch.Tensor] = {}
    for t in tensors:
        # not is_shard(): FSDP2 over tensor-parallel shards splits them as _StridedShard, which is not one
        over = tuple(t.device_mesh.get_group(d) for d, placement in enumerate(t.placements)
                     if not placement.is_replicate()) if isinstance(t, DTensor) else ()
        groups[over] = groups.get(over, 0) + local_part(t).detach().float().pow(2).sum()
    total = torch.zeros((), device=device)  # where NCCL can reduce it, even for a rank with nothing to add
    for over, sq in groups.items():
        for group in over:
            dist.all_reduce(sq, group=group)
        total = total + sq
    return total


def clip_grad_norm(layout, max_norm: float) -> None:
    """Clip by the norm over the whole model: shards add up across their ranks, stages across the pipeline."""
    params = [p for p in parameters(layout) if p.grad is not None]
    squared = squared_norm([p.grad for p in params], layout.device)
    if layout.pp_group is not None:
        dist.all_reduce(squared, group=layout.pp_group)
    # clamped, not compared with 1 in Python: the comparison would wait for the device every step
    scale = (max_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        local_part(p.grad).mul_(scale.to(p.grad.dtype))
