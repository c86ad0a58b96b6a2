"""The `raybig` command. Bad input exits 2 with one line per problem and no traceback."""
from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from raybig.errors import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed PyTorch training on Ray from one YAML job spec.")
# Wide enough for a metrics row when output goes to a file or CI log; a terminal sets its own width.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 120)

SetOption = typer.Option(None, "--set", metavar="PATH=VALUE", help="Override a spec field, e.g. --set train.epochs=3.")


def _fail(error: SpecError) -> None:
    for path, message in error.problems:
        err.print(f"[bold red]error[/]: {path + ': ' if path else ''}{message}", highlight=False, markup=True)
    raise typer.Exit(2)


def _load(spec_path: str, overrides: list[str] | None):
    from raybig.spec import load_spec

    try:
        return load_spec(spec_path, overrides or [])
    except SpecError as error:
        _fail(error)


@app.command()
def validate(
    spec_path: str = typer.Argument(..., metavar="SPEC"),
    set_: Optional[list[str]] = SetOption,
    num_cpus: Optional[float] = typer.Option(None, help="CPUs of the target cluster (default: this machine's)."),
):
    """Check a job spec, its data, and that `raybig run` could place its workers, without starting anything."""
    from raybig.cluster import embedded_cpus
    from raybig.data.datasets import describe
    from raybig.train.runner import check_plan

    spec = _load(spec_path, set_)
    try:
        meta = describe(spec.data)
        check_plan(spec, meta, embedded_cpus(num_cpus))
    except SpecError as error:
        _fail(error)
    p = spec.parallelism
    out.print(f"[green]ok[/]: {spec_path} ({spec.name}: {spec.model.kind} on {spec.data.source}, "
              f"{p.workers} worker(s): data {p.data} x pipeline {p.pipeline.stages})", highlight=False)
    if p.pipeline.stages > 1:
        from raybig.models import build_model
        from raybig.train.parallel import describe_stages

        for line in describe_stages(build_model(spec.model, meta), p.pipeline):
            out.print(f"  {line}", highlight=False)


@app.command()
def schema():
    """Print the JSON Schema of the job spec (for editors and CI)."""
    from raybig.spec import json_schema

    sys.stdout.write(json_schema() + "\n")


@app.command()
def run(
    spec_path: str = typer.Argument(..., metavar="SPEC"),
    set_: Optional[list[str]] = SetOption,
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster instead of starting an embedded one."),
    num_cpus: Optional[float] = typer.Option(None, help="Logical CPUs of the embedded Ray (default: this machine's)."),
    fresh: bool = typer.Option(False, help="Discard this run's checkpoints and start from scratch."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's and the workers' own logs."),
):
    """Train a job spec; rerunning an interrupted run resumes from its last checkpoint."""
    from raybig.train.progress import epoch_table
    from raybig.train.runner import RunFailed, run as run_job

    spec = _load(spec_path, set_)
    err.print(f"[bold]{spec.name}[/]: {spec.model.kind} on {spec.data.source}, data parallel x{spec.parallelism.data}, "
              f"{spec.train.epochs} epochs, global batch {spec.train.batch_size}", highlight=False)
    try:
        outcome = run_job(spec, address=address, num_cpus=num_cpus, fresh=fresh, verbose=verbose, console=err)
    except SpecError as error:
        _fail(error)
    except RunFailed as error:
        err.print(f"[bold red]run failed[/]: {error}\nrerun the same command to resume from the last checkpoint",
                  highlight=False)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: rerun the same command to resume from the last checkpoint")
        raise typer.Exit(130)
    root = outcome.store.root
    if outcome.already_complete:
        err.print(f"{root} already holds all {spec.train.epochs} epochs (use --fresh to train again)")
        out.print(epoch_table(outcome.history[-1:]))
    final = outcome.final
    out.print(f"[green]done[/]: val accuracy {final.get('val_accuracy', float('nan')):.2%}, "
              f"val loss {final.get('val_loss', float('nan')):.4f} after epoch {final.get('epoch', 0)}"
              + (f" in {outcome.seconds:.0f} s" if outcome.seconds else ""), highlight=False)
    out.print(f"model: {root / 'model.safetensors'}\nrun:   {root}/ (spec.yaml, metrics.json, curves.png, "
              "tensorboard/, checkpoints/)", highlight=False)


def main() -> None:  # pragma: no cover - console script entry
    app()
