"""The layouts a spec can run in over N workers, and the memory each rank needs for the model's state.

Every factorisation of the workers into data x pipeline stages x tensor degrees (and, with more than one data
rank, ddp or fsdp) is checked as `raybig validate` would check a spec that asked for it; each one that passes
gets its ranks' exact share of the model: the parameters a rank holds (its stages, its tensor-parallel slice
of each split layer, its FSDP shard of each), and from them the bytes of parameters, gradients and optimizer
state (fp32). Activations are not predicted. This is the enumeration and memory model `parallelism: auto`
builds on; it does not measure or pick yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from raybig.errors import SpecError

# optimizer state per trained element, in fp32 values
STATE_VALUES = {"sgd": 0, "momentum": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2}


@dataclass
class Candidate:
    parallelism: dict
    degrees: str
    problem: str | None = None  # why it cannot run; None: it can
    held: list[int] | None = None  # parameters each rank holds, in rank order
    state_bytes: list[int] | None = None  # parameters + gradients + optimizer state, per rank


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(spec, workers: int) -> list[dict]:
    """Every (data, data_mode, stages, tensor) whose degrees multiply to `workers`; pipeline settings other
    than the degree are the spec's (microbatches at least the stages)."""
    pipe = spec.parallelism.pipeline
    out = []
    for tensor in divisors(workers):
        for stages in divisors(workers // tensor):
            data = workers // (tensor * stages)
            pipeline = {"stages": stages, "schedule": pipe.schedule, "microbatches": max(pipe.microbatches, stages),
                        "virtual_stages": pipe.virtual_stages}
            for mode in (("ddp", "fsdp") if data > 1 else ("ddp",)):
                out.append({"data": data, "data_mode": mode, "tensor": tensor, "pipeline": pipeline})
    return out


def plan(spec, meta, workers: int) -> list[Candidate]:
    """Each layout over `workers`, with its problem or its ranks' memory."""
    from raybig.models import build_model
    from raybig.spec import parse_spec
    from raybig.train.runner import layer_problems, stage_problems

    raw = spec.model_dump(mode="json")
    model = build_model(spec.model, meta)
    out = []
    for parallelism in layouts(spec, workers):
        try:
            candidate_spec = parse_spec({**raw, "parallelism": parallelism})
        except SpecError as err:
            field, message = err.problems[0]
            out.append(Candidate(parallelism, _degrees(parallelism), f"{field}: {message}"))
            continue
        problems = []
        if candidate_spec.parallelism.pipeline.stages > 1:
            problems += stage_problems(candidate_spec, model, meta)
        problems += layer_problems(candidate_spec, model)
        candidate = Candidate(parallelism, candidate_spec.parallelism.degrees,
                              "; ".join(f"{f}: {m}" for f, m in problems) or None)
        if candidate.problem is None:
            candidate.held, trained = rank_parameters(model, candidate_spec)
            values = 2 + STATE_VALUES[candidate_spec.train.optimizer.name]  # the value, its gradient, the state
            candidate.state_bytes = [4 * (h + (values - 1) * t) for h, t in zip(candidate.held, trained)]
        out.append(candidate)
    return out


def _degrees(parallelism: dict) -> str:
    from raybig.spec import ParallelismSpec

    return ParallelismSpec.model_validate(parallelism).degrees


def rank_parameters(model: nn.Module, spec) -> tuple[list[int], list[int]]:
    """The parameters each rank holds, and of those the trained ones, in rank order
    (rank = (dp_index * stages + pp_index) * tensor + tp_index), as raybig's layouts place them."""
    from raybig.models.parts import model_parts
    from raybig.train.parallel import split_parts, stage_starts
    from raybig.train.tensor_parallel import planned_layers, tensor_plan

    p = spec.parallelism
    dp, pp, tp = p.data, p.pipeline.stages, p.tensor
    planned = {path: style for path, _, style in planned_layers(model, tensor_plan(model))} if tp > 1 else {}
    if pp > 1:
        parts = model_parts(model, getattr(spec.model, "blocks", None))
        total = p.pipeline.total_stages
        stage_params = [_part_parameters(group)
                        for group in split_parts(parts, stage_starts(parts, total, p.pipeline.split_points))]
        per_pp = [[pair for s in range(i, total, pp) for pair in stage_params[s]] for i in range(pp)]
    else:
        per_pp = [list(model.named_parameters())]
    sharded = p.data_mode == "fsdp" and dp > 1
    held, trained = [], []
    for dp_index in range(dp):
        for pp_index in range(pp):
            counts = [(_local_numel(name, param, planned, tp, dp_index if sharded else None, dp), param.requires_grad)
                      for name, param in per_pp[pp_index]]
            for _ in range(tp):  # the ranks of a tensor-parallel group hold equal slices
                held.append(sum(n for n, _ in counts))
                trained.append(sum(n for n, grad in counts if grad))
    return held, trained


def _part_parameters(parts) -> list[tuple[str, nn.Parameter]]:
    seen, out = set(), []
    for part in parts:
        for path, module in part.modules.items():
            for name, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    out.append((f"{path}.{name}", param))
    return out


def _local_numel(name: str, param: nn.Parameter, planned: dict[str, str], tp: int, dp_index: int | None,
                 dp: int) -> int:
    """This rank's elements of `param`: a split layer's slice (columns: weight and bias; rows: the weight),
    then FSDP2's shard of dim 0 (torch.chunk's pieces, the last ones shorter or absent)."""
    shape = list(param.shape)
    layer, _, leaf = name.rpartition(".")
    style = planned.get(layer)
    if style == "colwise":
        shape[0] //= tp
    elif style == "rowwise" and leaf == "weight":
        shape[1] //= tp
    if dp_index is not None and shape:
        size = math.ceil(shape[0] / dp)
        shape[0] = max(0, min(size, shape[0] - dp_index * size))
    return math.prod(shape)
