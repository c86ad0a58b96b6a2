"""A sweep's search space, addressed by the job spec's own dotted paths.

A sampled config is a flat {path: value} dict; `apply_config` writes it into the base spec, and the
result is validated like any spec before its trial starts. `space_problems` checks every axis up front
by parsing the spec at the axis' probe values (each listed value, or a range's ends), so a sweep with an
unknown path or a range the schema refuses stops before anything starts, naming the axis.
"""
from __future__ import annotations

from typing import Any

from raybig.errors import SpecError

OPTIMIZER = "train.optimizer"
# The sweep sets these itself for every trial.
RESERVED = ("name", "output", "sweep")
# What PBT may perturb while a trial trains (the model and data stay fixed: a checkpoint must still fit).
PERTURBABLE = ("train.optimizer.", "train.regularization.")


def base_of(spec) -> dict:
    """The spec as the user wrote it (unset fields left out, so they take the defaults of whatever a trial
    samples, e.g. another optimizer's), without the sweep section. The optimizer's name is always in: a
    sampled train.optimizer.lr must land on the optimizer the spec resolves to, even the default one."""
    from raybig.spec import set_path

    base = spec.model_dump(mode="json", exclude_unset=True, exclude={"sweep"})
    return set_path(base, f"{OPTIMIZER}.name", spec.train.optimizer.name)


def _optimizer_fields() -> dict[str, set[str]]:
    from raybig.spec import OptimizerSpec

    members = OptimizerSpec.__origin__.__args__
    return {m.model_fields["name"].annotation.__args__[0]: set(m.model_fields) for m in members}


def apply_config(base: dict, config: dict[str, Any]) -> dict:
    """The raw spec of one trial. When the optimizer's name is sampled, fields the chosen optimizer does not
    take (momentum for adam, betas for sgd) are left out rather than making the trial invalid."""
    from raybig.spec import set_path

    raw = base
    for path, value in config.items():
        raw = set_path(raw, path, value)
    if f"{OPTIMIZER}.name" in config:
        optimizer = dict(raw["train"]["optimizer"])
        accepted = _optimizer_fields().get(optimizer["name"], set(optimizer))
        raw = set_path(raw, OPTIMIZER, {k: v for k, v in optimizer.items() if k in accepted})
    return raw


def clip_to_space(config: dict[str, Any], space: dict) -> dict[str, Any]:
    """PBT perturbs a value by a factor, which can leave its range (dropout 0.9 x 1.2): keep it inside."""
    out = dict(config)
    for path, dim in space.items():
        if path in out and dim.kind in ("uniform", "loguniform", "randint") and out[path] is not None:
            low, high = dim.args
            high = high - 1 if dim.kind == "randint" else high
            value = min(max(out[path], low), high)
            out[path] = int(round(value)) if dim.kind == "randint" else value
    return out


def trial_spec(base: dict, config: dict[str, Any], name: str, output_dir: str):
    from raybig.spec import parse_spec, set_path

    raw = set_path(set_path(apply_config(base, config), "name", name), "output.dir", output_dir)
    return parse_spec(raw, source=f"trial {name}")


def space_problems(spec) -> list[tuple[str, str]]:
    """Every axis checked against the schema at its probe values, plus what the searcher and scheduler need."""
    sweep = spec.sweep
    base = base_of(spec)
    names = [str(n) for n in sweep.space[f"{OPTIMIZER}.name"].probes()] if f"{OPTIMIZER}.name" in sweep.space \
        else [spec.train.optimizer.name]
    problems = []
    for path, dim in sweep.space.items():
        problem = _axis_problem(base, path, dim, names)
        if problem:
            problems.append((f"sweep.space.{path}", problem))
    if not problems:
        problems += _combination_problems(base, sweep.space)
    return problems + _plan_problems(sweep)


# Above this many combinations of probe values, only each axis alone is checked (parsing a spec takes ~0.1 ms).
MAX_COMBINATIONS = 4096


def _combination_problems(base: dict, space: dict) -> list[tuple[str, str]]:
    """Axes can be valid alone and not together (a batch size the data degree does not divide): parse the
    spec at every combination of the axes' probe values."""
    import itertools
    import math

    from raybig.spec import parse_spec

    paths = list(space)
    probes = [space[path].probes() for path in paths]
    if len(paths) < 2 or math.prod(len(p) for p in probes) > MAX_COMBINATIONS:
        return []
    for values in itertools.product(*probes):
        config = dict(zip(paths, values))
        try:
            parse_spec(apply_config(base, config))
        except SpecError as err:
            problem_path, message = err.problems[0]
            together = " with ".join(f"{path}={value!r}" for path, value in config.items())
            return [("sweep.space", f"{together}: {problem_path}: {message}")]
    return []


def _axis_problem(base: dict, path: str, dim, optimizer_names: list[str]) -> str | None:
    """What is wrong with one axis at its first bad probe value, or None. An optimizer field is probed with
    each optimizer of the sweep that takes it."""
    from raybig.spec import parse_spec

    section = path.split(".")[0]
    if section in RESERVED:
        return f"{section} is set by the sweep itself; it cannot be searched"
    contexts = [{}]
    field = path[len(OPTIMIZER) + 1:] if path.startswith(OPTIMIZER + ".") else None
    if field and field != "name":
        fields = _optimizer_fields()
        takers = [n for n in optimizer_names if field in fields.get(n, ())]
        if not takers:
            return f"no optimizer in this sweep ({', '.join(optimizer_names)}) takes {field}"
        contexts = [{f"{OPTIMIZER}.name": n} for n in takers]
    for value in dim.probes():
        for context in contexts:
            try:
                parse_spec(apply_config(base, {**context, path: value}))
            except SpecError as err:
                problem_path, message = err.problems[0]
                shown = "not a field of the job spec" if message == "unknown field" else message
                return f"{value!r}: {problem_path}: {shown}"
    return None


def _plan_problems(sweep) -> list[tuple[str, str]]:
    kinds = {path: dim.kind for path, dim in sweep.space.items()}
    out = []
    if sweep.searcher == "grid":
        ranges = [p for p, k in kinds.items() if k not in ("choice", "grid")]
        if ranges:
            out.append(("sweep.searcher", f"grid tries listed values only; {', '.join(ranges)} "
                        "is a range: give it as choice or grid, or use the random or optuna searcher"))
        if sweep.trials is not None:
            out.append(("sweep.trials", "grid runs every combination once; leave trials out"))
    if sweep.searcher == "optuna" and "grid" in kinds.values():
        grids = [p for p, k in kinds.items() if k == "grid"]
        out.append(("sweep.searcher", f"optuna samples; it cannot enumerate grid axes ({', '.join(grids)}): "
                    "use choice"))
    if sweep.scheduler.name == "pbt":
        if sweep.searcher != "random":
            out.append(("sweep.scheduler", "pbt chooses its own configs; use it with the random searcher"))
        if not any(p.startswith(PERTURBABLE) and k != "grid" for p, k in kinds.items()):
            out.append(("sweep.scheduler", "pbt perturbs train.optimizer.* and train.regularization.*: "
                        "put at least one of them in sweep.space"))
    return out


def tune_space(sweep) -> dict:
    """Ray Tune's param_space. The grid searcher enumerates choices too."""
    from ray import tune

    out = {}
    for path, dim in sweep.space.items():
        if dim.kind == "grid" or (dim.kind == "choice" and sweep.searcher == "grid"):
            out[path] = tune.grid_search(list(dim.args))
        elif dim.kind == "choice":
            out[path] = tune.choice(list(dim.args))
        else:
            out[path] = getattr(tune, dim.kind)(*dim.args)
    return out


def mutations(sweep) -> dict:
    """What PBT perturbs: the space's optimizer and regularization axes."""
    space = tune_space(sweep)
    return {p: d for p, d in space.items() if p.startswith(PERTURBABLE) and sweep.space[p].kind != "grid"
            and p != f"{OPTIMIZER}.name"}
