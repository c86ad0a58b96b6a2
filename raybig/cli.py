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


@app.command("serve")
def serve_runs(
    runs: list[str] = typer.Argument(..., metavar="RUN_DIR...", help="Run directories, or name:version=RUN_DIR."),
    host: Optional[str] = typer.Option(None, help="Default: the run's serve.host (127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Default: the run's serve.port (8000)."),
    address: Optional[str] = typer.Option(None, help="Serve on a running Ray cluster."),
    num_cpus: Optional[float] = typer.Option(None, help="Logical CPUs of the embedded Ray."),
    export: Optional[str] = typer.Option(None, metavar="DIR", help="Write serve_config.yaml (for `serve deploy`) "
                                         "and rayservice.yaml (KubeRay) to DIR instead of serving."),
    cluster_path: Optional[str] = typer.Option(None, help="With --export: where the run directories live on the "
                                               "cluster, e.g. /models."),
    store_claim: Optional[str] = typer.Option(None, help="With --export: a PersistentVolumeClaim mounted at /models."),
):
    """Serve trained runs over HTTP until Ctrl-C: POST /v1/models/NAME/predict, GET /v1/models, /docs."""
    import time

    from ray import serve as ray_serve

    from raybig.cluster import ray_session
    from raybig.serve.app import entry_from_arg, start

    try:
        entries = [entry_from_arg(arg) for arg in runs]
    except SpecError as error:
        _fail(error)
    first = entries[0].serve
    if export:
        from raybig.serve.export import export as write_export

        for path in write_export(entries, export, port or first.port, store_claim=store_claim,
                                 path_prefix=cluster_path or ("/models" if store_claim else None)):
            out.print(f"wrote {path}", highlight=False)
        return
    with ray_session(address, num_cpus):
        url = start(entries, host or first.host, port or first.port)
        for e in entries:
            route = "generate" if e.info["data"]["task"] == "lm" else "predict"
            out.print(f"{e.name} {e.version}: POST {url}/v1/models/{e.name}/{route}", highlight=False)
        out.print(f"models: GET {url}/v1/models   docs: {url}/docs   (Ctrl-C stops)", highlight=False)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            err.print("shutting down")
        finally:
            ray_serve.shutdown()


@app.command()
def query(
    name: str = typer.Argument(..., help="The model's name."),
    input_path: Optional[str] = typer.Option(None, "--input", help="Samples: .json, .csv or .npy."),
    prompt: Optional[str] = typer.Option(None, help="For a language model: the text to continue."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(1.0),
    version: Optional[str] = typer.Option(None, help="A version other than the default."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The server's base URL."),
    token: Optional[str] = typer.Option(None, envvar="RAYBIG_TOKEN", help="Bearer token, if the server wants one."),
):
    """Query a served model and print the predictions as a table."""
    from rich.table import Table

    from raybig.serve.client import post, read_inputs

    try:
        if prompt is not None:
            reply = post(f"{url}/v1/models/{name}/generate", {"prompt": prompt, "max_new_tokens": max_new_tokens,
                                                              "temperature": temperature}, token, version)
            out.print(f"[bold]{name} {reply['version']}[/]: {prompt}[green]{reply['text']}[/]", highlight=False)
            return
        if input_path is None:
            raise SpecError("give --input FILE (or --prompt for a language model)", "--input")
        reply = post(f"{url}/v1/models/{name}/predict", {"inputs": read_inputs(input_path)}, token, version)
    except SpecError as error:
        _fail(error)
    table = Table(title=f"{name} {reply['version']}")
    for column in ("sample", "label", "probability", "runner-up"):
        table.add_column(column, justify="right")
    for i, p in enumerate(reply["predictions"]):
        ranked = sorted(range(len(p["probabilities"])), key=lambda k: -p["probabilities"][k])
        table.add_row(str(i), str(p["label"]), f"{p['probabilities'][p['label']]:.3f}",
                      f"{ranked[1]} ({p['probabilities'][ranked[1]]:.3f})" if len(ranked) > 1 else "")
    out.print(table)


@app.command()
def demo(
    spec_path: str = typer.Argument("jobs/digits_cnn.yaml", metavar="SPEC"),
    samples: int = typer.Option(8, help="Validation samples to send to the served model."),
    num_cpus: Optional[float] = typer.Option(None, help="Logical CPUs of the embedded Ray."),
):
    """The whole story on one embedded Ray: train (or resume), serve, query with real samples, shut down."""
    from ray import serve as ray_serve
    from rich.table import Table

    from raybig.cluster import ray_session
    from raybig.data.datasets import load
    from raybig.serve.app import entry_from_arg, start
    from raybig.serve.client import post
    from raybig.train.runner import RunFailed, run as run_job

    spec = _load(spec_path, [])
    if spec.serve.auth_token_env:
        _fail(SpecError("the demo sends queries without a token; unset it for the demo", "serve.auth_token_env"))
    with ray_session(None, num_cpus):
        try:
            outcome = run_job(spec, num_cpus=num_cpus, console=err)
        except (SpecError, RunFailed) as error:
            _fail(error if isinstance(error, SpecError) else SpecError(str(error)))
        root = outcome.store.root
        out.print(f"[green]trained[/]: {root / 'model.safetensors'} (val accuracy "
                  f"{outcome.final.get('val_accuracy', float('nan')):.2%}, epoch {outcome.final.get('epoch')})",
                  highlight=False)
        entry = entry_from_arg(str(root))
        url = start([entry], spec.serve.host, spec.serve.port)
        out.print(f"[green]serving[/]: POST {url}/v1/models/{entry.name}/predict", highlight=False)
        try:
            bundle = load(spec.data)
            x, y = bundle.val.x[:samples], bundle.val.y[:samples]
            reply = post(f"{url}/v1/models/{entry.name}/predict", {"inputs": x.tolist()})
            table = Table(title=f"{samples} validation samples through HTTP")
            for column in ("sample", "true label", "predicted", "probability", ""):
                table.add_column(column, justify="right")
            for i, (p, label) in enumerate(zip(reply["predictions"], y)):
                table.add_row(str(i), str(int(label)), str(p["label"]), f"{p['probabilities'][p['label']]:.3f}",
                              "[green]ok[/]" if p["label"] == int(label) else "[red]wrong[/]")
            out.print(table)
        finally:
            ray_serve.shutdown()
    out.print("[green]done[/]: the server is shut down; `raybig serve " + str(root) + "` serves it again",
              highlight=False)


def main() -> None:  # pragma: no cover - console script entry
    app()
