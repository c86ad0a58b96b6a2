"""The `raybig` command. Bad input exits 2 with one line per problem and no traceback."""
from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from raybig.errors import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed PyTorch training on Ray from one YAML job spec.")
# Wide enough for a metrics row when output goes to a file or CI log; a terminal sets its own width.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 120)

SetOption = typer.Option(None, "--set", metavar="PATH=VALUE", help="Override a spec field, e.g. --set train.epochs=3.")
TrackingUriOption = typer.Option(None, "--tracking-uri", help="The MLflow tracking server or store; default "
                                  "$MLFLOW_TRACKING_URI, else the run's own, else sqlite:///runs/mlflow.db.")


def _fail(error: SpecError) -> None:
    for path, message in error.problems:
        # escaped: a message may quote text with brackets (a file's row, a worker's error)
        err.print(f"[bold red]error[/]: {escape(path + ': ' if path else '')}{escape(message)}", highlight=False)
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
        meta = describe(spec.data, spec.model)
        notes = check_plan(spec, meta, embedded_cpus(num_cpus))
    except SpecError as error:
        _fail(error)
    p = spec.parallelism
    out.print(f"[green]ok[/]: {spec_path} ({spec.name}: {spec.model.kind} on {spec.data.source}, "
              f"{p.workers} worker(s): {p.degrees})", highlight=False)
    for note in notes:
        out.print(f"  {escape(note)}", highlight=False)
    if spec.init_from is not None or p.pipeline.stages > 1:
        from raybig.models import build_model
        from raybig.models.parts import NoParts, model_parts

        try:
            parts = model_parts(build_model(spec.model, meta), getattr(spec.model, "blocks", None))
        except NoParts:  # check_plan refused stages of such a model; init_from then freezes by name only
            parts = []
    if spec.init_from is not None and parts:  # what init_from.train_last counts
        out.print("  parts: " + ", ".join(f"{i} {next(iter(part.modules))} ({part.name})"
                                          for i, part in enumerate(parts)), highlight=False)
    if p.pipeline.stages > 1:
        from raybig.train.parallel import describe_stages

        for line in describe_stages(parts, p.pipeline):
            out.print(f"  {line}", highlight=False)
    if spec.sweep is not None:
        from raybig.sweep.driver import concurrency_note, expected_trials

        sw = spec.sweep
        out.print(f"  sweep: {expected_trials(sw)} trial(s), {sw.searcher} search, {sw.scheduler.name} scheduler, "
                  f"{sw.goal} {sw.metric}, {sw.max_concurrent} at a time", highlight=False)
        for path, dim in sw.space.items():
            out.print(f"    {path}: {dim.kind} {dim.args}", highlight=False)
        note = concurrency_note(spec, embedded_cpus(num_cpus))
        if note:
            out.print(f"  [yellow]{note}[/]", highlight=False)


@app.command("plan")
def plan_layouts(
    spec_path: str = typer.Argument(..., metavar="SPEC"),
    set_: Optional[list[str]] = SetOption,
    workers: Optional[int] = typer.Option(None, min=1, help="Workers to lay out (default: the spec's)."),
    memory_mb: Optional[float] = typer.Option(None, help="Memory a rank may give the model's state, to mark "
                                              "which layouts fit."),
):
    """Every layout of the spec's model over N workers (data x pipeline x tensor, ddp or fsdp): what each rank
    holds of the model and its state's memory (parameters, gradients, optimizer state; activations not
    included), or why the layout cannot run. Nothing is started."""
    from rich.table import Table

    from raybig.data.datasets import describe
    from raybig.plan import plan

    spec = _load(spec_path, set_)
    n = workers or spec.parallelism.workers
    try:
        candidates = plan(spec, describe(spec.data, spec.model), n)
    except SpecError as error:
        _fail(error)
    candidates.sort(key=lambda c: (c.problem is not None, max(c.state_bytes or [0])))
    table = Table(title=f"{spec.name}: layouts over {n} worker(s), the largest rank's share", header_style="bold",
                  show_edge=False)
    for column in ("layout", "parameters", "state MB", "fits" if memory_mb else None, "why not"):
        if column:
            table.add_column(column, justify="left" if column in ("layout", "why not") else "right")
    for c in candidates:
        state = max(c.state_bytes) / 2**20 if c.state_bytes else None
        row = [c.degrees, f"{max(c.held):,}" if c.held else "", f"{state:.1f}" if state is not None else ""]
        if memory_mb:
            row.append("" if state is None else ("yes" if state <= memory_mb else "no"))
        table.add_row(*row, escape(c.problem or ""))
    out.print(table)


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
    profile_startup: bool = typer.Option(False, "--profile-startup",
                                         help="Print where the time went: each phase of start-up, training, teardown."),
):
    """Train a job spec; rerunning an interrupted run resumes from its last checkpoint."""
    import signal

    from raybig.phases import Phases
    from raybig.train.progress import epoch_table
    from raybig.train.runner import RunFailed, run as run_job

    phases = Phases()
    spec = _load(spec_path, set_)
    err.print(f"[bold]{spec.name}[/]: {spec.model.kind} on {spec.data.source}, {spec.parallelism.degrees}, "
              f"{spec.train.epochs} epochs, global batch {spec.train.batch_size}", highlight=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (see serve)
    phases.mark("python, imports, spec")
    try:
        outcome = run_job(spec, address=address, num_cpus=num_cpus, fresh=fresh, verbose=verbose, console=err,
                          phases=phases)
    except SpecError as error:
        _fail(error)
    except RunFailed as error:
        hint = ("rerun the same command to resume from the last checkpoint" if error.rerun_helps else
                "the same command would stop at the same error: fix its cause (the spec, the data or the model "
                "code), then rerun to resume from the last checkpoint")
        err.print(f"[bold red]run failed[/]: {escape(str(error))}\n{hint}", highlight=False)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: rerun the same command to resume from the last checkpoint")
        raise typer.Exit(130)
    from raybig.store_io import is_uri

    where = outcome.store.location
    root = where if is_uri(where) else outcome.store.root  # an s3:// / gs:// run is named by its URI
    if outcome.already_complete:
        trained = f"{spec.train.max_steps} steps" if spec.train.max_steps else f"{spec.train.epochs} epochs"
        err.print(f"{root} already holds all {trained} (use --fresh to train again)")
        out.print(epoch_table(outcome.history[-1:]))
    final = outcome.final
    if "val_perplexity" in final:
        figures = f"val perplexity {final['val_perplexity']:.2f}, val token accuracy {final['val_token_accuracy']:.2%}"
    elif "val_mse" in final:
        figures = f"val mse {final['val_mse']:.4g}, val mae {final['val_mae']:.4g}"
    else:
        figures = f"val accuracy {final.get('val_accuracy', float('nan')):.2%}"
    out.print(f"[green]done[/]: {figures}, "
              f"val loss {final.get('val_loss', float('nan')):.4f} after "
              + (f"step {final.get('step', 0)}" if spec.train.max_steps else f"epoch {final.get('epoch', 0)}")
              + (f" in {outcome.seconds:.0f} s" if outcome.seconds else ""), highlight=False)
    pretrained = ", hf/ (save_pretrained)" if spec.model.kind == "hf" else ""
    out.print(f"model: {root}/model.safetensors\nrun:   {root}/ (spec.yaml, metrics.json, curves.png, "
              f"tensorboard/, checkpoints/{pretrained})", highlight=False)
    if profile_startup and not outcome.already_complete:
        err.print(phases.table("where the time went", work=TRAINING_PHASES))


# the phases of a run that are its training; the rest is the fixed cost around it (raybig.phases)
TRAINING_PHASES = ("first step", "training (steps after the first, evaluation, checkpoints)")


@app.command()
def sweep(
    spec_path: str = typer.Argument(..., metavar="SPEC"),
    set_: Optional[list[str]] = SetOption,
    resume: bool = typer.Option(False, help="Continue an interrupted sweep; finished trials are not rerun."),
    fresh: bool = typer.Option(False, help="Discard this sweep's trials and results and start over."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster instead of starting an embedded one."),
    num_cpus: Optional[float] = typer.Option(None, help="Logical CPUs of the embedded Ray (default: this machine's)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's and the workers' own logs."),
    profile_startup: bool = typer.Option(False, "--profile-startup",
                                         help="Print where the trials' time went: each phase, over all trials."),
):
    """Search hyperparameters with Ray Tune (the spec's sweep section); each trial is a full run, and the best
    trial's model becomes the run runs/<name>."""
    from rich.table import Table

    from raybig.sweep.driver import run_sweep

    spec = _load(spec_path, set_)
    if spec.sweep is None:
        _fail(SpecError("the spec has no sweep section to search (see docs/sweeps.md)", "sweep"))
    sw = spec.sweep
    err.print(f"[bold]{spec.name}[/]: {'resuming ' if resume else ''}{sw.searcher} search over "
              f"{', '.join(sw.space)}; {sw.scheduler.name} scheduler, {sw.max_concurrent} trial(s) at a time, "
              f"each {spec.parallelism.degrees}", highlight=False)
    try:
        outcome = run_sweep(spec, resume=resume, fresh=fresh, address=address, num_cpus=num_cpus, verbose=verbose,
                            console=err)
    except SpecError as error:
        _fail(error)
    except KeyboardInterrupt:  # before Tune took over Ctrl-C (starting Ray) or after it let go (writing results)
        err.print(f"[yellow]interrupted[/]: `raybig sweep {spec_path} --resume` continues it", highlight=False)
        raise typer.Exit(130)
    table = Table(title=f"{len(outcome.rows)} trials", header_style="bold", show_edge=False)
    columns = ["trial", "status", "epochs", sw.metric, *sw.space, "reason"]
    for column in columns:
        table.add_column(column.removeprefix("train."), justify="left" if column == "reason" else "right")
    for row in outcome.rows:
        table.add_row(*[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    out.print(table)
    out.print(f"results: {outcome.sweep_dir}/results.parquet (and .csv), plots in {outcome.sweep_dir}/plots/",
              highlight=False)
    if profile_startup:
        from raybig.phases import trial_phases_table

        err.print(trial_phases_table(outcome.sweep_dir / "trials"))
    if outcome.interrupted:
        err.print(f"[yellow]interrupted[/]: `raybig sweep {spec_path} --resume` continues it; finished trials "
                  "are kept", highlight=False)
        raise typer.Exit(130)
    if outcome.best is None:
        err.print("[bold red]no trial finished[/]: see the reason column", highlight=False)
        raise typer.Exit(1)
    b = outcome.best
    out.print(f"[green]best[/]: trial {b['trial']}, {sw.metric} {b[sw.metric]:.4f} after {b['epochs']} epochs "
              f"({', '.join(f'{p}={b[p]}' for p in sw.space)}) in {outcome.seconds:.0f} s", highlight=False)
    out.print(f"model: {outcome.root}/model.safetensors (serve it: raybig serve {outcome.root})", highlight=False)


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
    trust_code: bool = typer.Option(False, "--trust-code", help="Serve runs whose model is your own code (model "
                                    "kind python): their factory is imported and run in every replica."),
    tracking_uri: Optional[str] = TrackingUriOption,
    profile_startup: bool = typer.Option(False, "--profile-startup", help="Print where start-up went (imports, Ray, "
                                         "Serve and its replicas, the first request) and, at the end, teardown."),
):
    """Serve trained runs over HTTP until Ctrl-C: POST /v1/models/NAME/predict, GET /v1/models, /docs. A
    registered version serves by models:/NAME@ALIAS or models:/NAME/VERSION (as NAME, version vN)."""
    import signal
    import time

    from raybig.cluster import ray_session
    from raybig.phases import Phases
    from raybig.serve.app import ServeStartFailed, direct_urls, entry_from_arg, start, stop

    from raybig.lifecycle.registry import served_arg, store_uri

    try:  # only a registered version needs the registry (and MLflow's import)
        entries = [entry_from_arg(_registry_call(served_arg, arg, store_uri(tracking_uri))
                                  if arg.startswith("models:/") else arg, trust_code) for arg in runs]
    except SpecError as error:
        _fail(error)
    first = entries[0].serve
    phases = Phases()
    phases.mark("python, imports, runs")
    if export:
        from raybig.serve.export import export as write_export

        for path in write_export(entries, export, port or first.port, store_claim=store_claim,
                                 path_prefix=cluster_path or ("/models" if store_claim else None)):
            out.print(f"wrote {path}", highlight=False)
        return
    with ray_session(address, num_cpus):
        phases.mark("Ray start or connect")
        try:
            url = start(entries, host or first.host, port or first.port)
            phases.mark("Serve up: controller, proxy, replicas ready")
        except ServeStartFailed as error:
            err.print(f"[bold red]serve failed[/]: {error}", highlight=False)
            raise typer.Exit(1)
        # `raybig jobs stop` (and Kubernetes) end a server with SIGTERM: stop serving then too, not only on Ctrl-C.
        # SIGINT is set too: a process started in the background by a script inherits it ignored, and Python
        # then never raises KeyboardInterrupt, so `kill -INT` left the server and its Ray running
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.default_int_handler)
        try:  # from here on a Ctrl-C, however early, takes the application down
            direct = [u for u in direct_urls(host or first.host) if u != url]
            for e in entries:
                route = "generate" if e.info["data"]["task"] == "lm" else "predict"
                out.print(f"{e.name} {e.version}: POST {url}/v1/models/{e.name}/{route}", highlight=False)
            if direct:  # the same app without the proxy hop: several times the requests/s on a small machine
                out.print(f"direct to a replica (fastest): {'  '.join(direct)}", highlight=False)
            if profile_startup:
                _first_request(f"{url}/v1/models", phases)
                err.print(phases.table("where start-up went"))
            out.print(f"models: GET {url}/v1/models   docs: {url}/docs   (Ctrl-C stops)", highlight=False)
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            err.print("shutting down")
        finally:
            stopping = time.time()
            stop(on_cluster=bool(address))
    if profile_startup:
        err.print(f"teardown (Serve and Ray): {time.time() - stopping:.2f} s", highlight=False)


def _first_request(url: str, phases) -> None:
    """One request through the proxy, as a client's first would go (connection set-up included); any answer
    counts (a server that wants a token answers 401)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30):
            pass
    except urllib.error.HTTPError:
        pass
    except OSError as error:
        err.print(f"[yellow]the first request got no answer[/]: {escape(str(error))}", highlight=False)
        return
    phases.mark("first request (GET /v1/models)")


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
def compress(
    run_dir: str = typer.Argument(..., metavar="RUN", help="A trained run's directory."),
    method: str = typer.Option(..., help="quantize (int8 Linear/LSTM weights), prune (zero the smallest weights, "
                               "then fine-tune) or low_rank (factorise Linear layers)."),
    sparsity: float = typer.Option(0.8, help="prune: the fraction of weights set to zero."),
    scope: str = typer.Option("global", help="prune: global (one threshold for every layer) or layer (each its own)."),
    finetune_epochs: int = typer.Option(2, help="prune: epochs of fine-tuning with the zeros kept (0: none)."),
    rank: Optional[int] = typer.Option(None, help="low_rank: the rank of every factorised layer."),
    energy: Optional[float] = typer.Option(None, help="low_rank: keep the smallest rank holding this fraction of "
                                           "each layer's energy (default 0.9 when --rank is not given)."),
    name: Optional[str] = typer.Option(None, help="The new run's name, beside RUN (default e.g. RUN-int8)."),
    fresh: bool = typer.Option(False, help="Replace a run of that name."),
    num_cpus: Optional[float] = typer.Option(None, help="prune: logical CPUs of the fine-tune's embedded Ray."),
    trust_code: bool = typer.Option(False, help="RUN is a python model: loading it runs its factory's code."),
):
    """Make a smaller model of a trained run: a new run that `raybig serve` serves, with a comparison table
    (parameters, bytes on disk, CPU latency per batch, accuracy) and plot against the original."""
    from pathlib import Path

    from raybig.lifecycle import compress as c

    parent = Path(run_dir)
    problems = []
    if method not in c.METHODS:
        problems.append(("--method", f"{method!r} is not one of: {', '.join(c.METHODS)}"))
    if not 0 < sparsity < 1:
        problems.append(("--sparsity", f"expected a fraction between 0 and 1, got {sparsity}"))
    if scope not in ("global", "layer"):
        problems.append(("--scope", f"{scope!r} is not one of: global, layer"))
    if finetune_epochs < 0:
        problems.append(("--finetune-epochs", "expected 0 or more"))
    if rank is not None and rank < 1:
        problems.append(("--rank", "expected 1 or more"))
    if energy is not None and not 0 < energy <= 1:
        problems.append(("--energy", f"expected a fraction in (0, 1], got {energy}"))
    if rank is not None and energy is not None:
        problems.append(("--energy", "give --rank or --energy, not both"))
    if not (parent / "model.json").is_file():
        problems.append(("RUN", f"{parent} holds no trained model (no model.json)"))
    energy = energy if energy is not None or rank is not None else 0.9
    target = parent.parent / (name or c.default_name(parent.name, method, sparsity, rank, energy))
    if target.resolve() == parent.resolve():
        problems.append(("--name", "the new run needs a name of its own"))
    elif target.exists() and not fresh:
        problems.append(("--name", f"{target} exists; pass --fresh to replace it, or another --name"))
    if problems:
        _fail(SpecError(problems))
    from raybig.models.user import UntrustedCode
    from raybig.train.runner import RunFailed

    try:
        _, rows = c.compress(parent, target, method, sparsity=sparsity, scope=scope, rank=rank, energy=energy,
                             finetune_epochs=finetune_epochs, num_cpus=num_cpus, console=err, trust_code=trust_code)
    except SpecError as error:  # the fine-tune's spec or plan
        _fail(error)
    except RunFailed as error:
        err.print(f"[bold red]fine-tune failed[/]: {escape(str(error))}", highlight=False)
        raise typer.Exit(1)
    except ValueError as error:  # already compressed; no layer gets smaller at that rank
        _fail(SpecError(str(error), "--method"))
    except (UntrustedCode, OSError) as error:  # a python model without --trust-code; an unreadable run
        _fail(SpecError(str(error), "RUN"))
    out.print(c.table(rows), highlight=False)
    out.print(f"model: {target}/model.safetensors (raybig serve {target})\n"
              f"compared: {target}/compression.json, compression.png", highlight=False)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _registry_call(fn, *args):
    """A registry call whose MLflow error is the user's to fix (exit 2, no traceback)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except SpecError as error:
        _fail(error)
    except MlflowException as error:
        _fail(SpecError(str(error.message).splitlines()[0], "registry"))


@app.command("register")
def register_run(
    run_dir: str = typer.Argument(..., metavar="RUN", help="A trained run's directory."),
    name: str = typer.Argument(..., metavar="NAME", help="The registered model it becomes a version of."),
    alias: Optional[str] = typer.Option(None, help="Point this alias (e.g. champion) at the new version too."),
    tracking_uri: Optional[str] = TrackingUriOption,
):
    """Make a run's model a new version of NAME in the MLflow model registry (tracking the run if it is not)."""
    import re
    from pathlib import Path

    from raybig.lifecycle.registry import register, run_uri

    if not re.match(NAME_PATTERN, name):
        _fail(SpecError(f"{name!r}: letters, digits, '_', '.' and '-', starting with a letter or digit", "NAME"))
    uri = run_uri(Path(run_dir), tracking_uri)
    version = _registry_call(register, Path(run_dir), name, uri, alias)
    out.print(f"registered: models:/{name}/{version}" + (f" (models:/{name}@{alias})" if alias else "") +
              f" in {uri}", highlight=False)


@app.command()
def promote(
    name: str = typer.Argument(..., metavar="NAME"),
    version: int = typer.Argument(..., metavar="VERSION"),
    alias: str = typer.Option("champion", help="The alias that moves to VERSION."),
    tracking_uri: Optional[str] = TrackingUriOption,
):
    """Point an alias of a registered model (champion by default) at one of its versions."""
    from raybig.lifecycle.registry import promote as move, store_uri

    uri = store_uri(tracking_uri)
    _registry_call(move, name, version, alias, uri)
    out.print(f"models:/{name}@{alias} -> version {version} ({uri})", highlight=False)


@app.command()
def lineage(
    ref: str = typer.Argument(..., metavar="RUN|NAME|models:/NAME@ALIAS|models:/NAME/VERSION"),
    tracking_uri: Optional[str] = TrackingUriOption,
):
    """Print where a model came from: the registered version, its run and spec, and the runs before it. A
    registered NAME alone: each of its versions, newest first."""
    import re
    from pathlib import Path

    from raybig.lifecycle import registry

    if not Path(ref).exists() and re.match(NAME_PATTERN, ref):  # a registered model: all its versions
        versions = _registry_call(registry.versions_of, ref, registry.store_uri(tracking_uri))
        for number in versions:
            lineage(f"models:/{ref}/{number}", tracking_uri)
        return
    if ref.startswith("models:/"):
        uri = registry.store_uri(tracking_uri)
        version = _registry_call(registry.model_version, ref, uri)
        aliases = f" (aliases: {', '.join(version.aliases)})" if version.aliases else ""
        out.print(f"{ref} = {version.name} version {version.version}{aliases}, from MLflow run {version.run_id}",
                  highlight=False)
        run_dir = Path(version.tags.get("raybig.run_dir", ""))
        if not (run_dir / "model.json").is_file():  # registered elsewhere: its own files tell the rest
            run_dir, _, _ = _registry_call(registry.fetch, ref, uri)
        lines = registry.lineage(run_dir, depth=1)
    else:
        if not (Path(ref) / "model.json").is_file():
            _fail(SpecError(f"{ref} holds no trained model (no model.json)", "RUN"))
        lines = registry.lineage(Path(ref))
    for line in lines:
        out.print(escape(line), highlight=False)


@app.command()
def up(
    num_cpus: Optional[float] = typer.Option(None, help="Logical CPUs of the local Ray (default: this machine's)."),
    num_gpus: Optional[int] = typer.Option(None, help="GPUs of the local Ray (default: the ones Ray finds)."),
    spare_ranks: int = typer.Option(2, min=0, help="Rank processes kept warmed (torch imported) for the next "
                                                  "run; each holds a few hundred MB."),
):
    """Start a local Ray that stays up: `raybig run`, `sweep` and `serve` attach to it instead of starting
    their own, which saves each command Ray's start and stop. `raybig down` ends it."""
    from raybig.cluster import warm_up

    try:
        info, already = warm_up(num_cpus, num_gpus, spare_ranks)
    except SpecError as error:
        _fail(error)
    state = "already up" if already else "up"
    out.print(f"[green]{state}[/]: local Ray at {info['gcs']}, {info['num_cpus']} CPUs, {info.get('spare_ranks', 0)} "
              f"spare rank(s) warmed (process group {info['pgid']}, log {info['log']}); run, sweep and serve "
              "attach to it until `raybig down`", highlight=False)


@app.command()
def down():
    """End the local Ray `raybig up` started (its process group only)."""
    from raybig.cluster import warm_down

    out.print("[green]down[/]" if warm_down() else "no local Ray of `raybig up` is running")


@app.command()
def demo(
    spec_path: str = typer.Argument("jobs/digits_cnn.yaml", metavar="SPEC"),
    samples: int = typer.Option(8, help="Validation samples to send to the served model."),
    num_cpus: Optional[float] = typer.Option(None, help="Logical CPUs of the embedded Ray."),
):
    """The whole story on one embedded Ray: train (or resume), serve, query with real samples, shut down."""
    from rich.table import Table

    from raybig.cluster import ray_session
    from raybig.data.datasets import load
    from raybig.serve.app import ServeStartFailed, entry_from_arg, start, stop
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
        entry = entry_from_arg(str(root), trust_code=True)  # the demo's own spec: the user ran its code already
        try:
            url = start([entry], spec.serve.host, spec.serve.port)
        except ServeStartFailed as error:
            _fail(SpecError(str(error)))
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
            stop(on_cluster=False)
    out.print("[green]done[/]: the server is shut down; `raybig serve " + str(root) + "` serves it again",
              highlight=False)


cluster_app = typer.Typer(help="Start and stop a local Ray head described by a cluster file.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(jobs_app, name="jobs")
ClusterOption = typer.Option(None, "--cluster", metavar="FILE", help="A cluster file (clusters/*.yaml).")
AddressOption = typer.Option(None, "--address", help="Job submission address, e.g. http://HEAD:8265.")


def _cluster(path: str):
    from raybig.clusterspec import load_cluster

    try:
        return load_cluster(path)
    except SpecError as error:
        _fail(error)


def _target(cluster_file: Optional[str], address: Optional[str]):
    """(address, token, cluster spec or None) from --cluster or --address."""
    from raybig.submit import resolve_token

    if not cluster_file and not address:
        _fail(SpecError("give --cluster FILE or --address http://HEAD:8265"))
    cluster = _cluster(cluster_file) if cluster_file else None
    try:
        return (address or cluster.submit_address), resolve_token(cluster), cluster
    except SpecError as error:
        _fail(error)


@cluster_app.command("up")
def cluster_up(cluster_file: str = typer.Argument(..., metavar="FILE")):
    """Start the file's head on this machine (loopback) and wait until it takes jobs."""
    from raybig.submit import cluster_up as up

    try:
        info = up(_cluster(cluster_file))
    except SpecError as error:
        _fail(error)
    out.print(f"[green]up[/]: jobs at {info['address']}, Ray at {info['gcs']} (process group {info['pgid']}; "
              f"log {info['log']})", highlight=False)


@cluster_app.command("down")
def cluster_down(cluster_file: str = typer.Argument(..., metavar="FILE")):
    """Stop the head `raybig cluster up` started for this file (its process group only)."""
    from raybig.submit import cluster_down as down

    out.print("[green]down[/]" if down(_cluster(cluster_file)) else "no head of this file is running")


@app.command()
def submit(
    spec_path: str = typer.Argument(..., metavar="SPEC"),
    set_: Optional[list[str]] = SetOption,
    cluster_file: Optional[str] = ClusterOption,
    address: Optional[str] = AddressOption,
    store: Optional[str] = typer.Option(None, help="The model store as the cluster sees it: an absolute path, or "
                                        "an s3:// or gs:// URI (default: the cluster file's)."),
    command: str = typer.Option("run", help="What the job runs with the spec: run, sweep, or serve (the run the "
                                "spec trained, from the store)."),
    follow: bool = typer.Option(False, help="Stream the job's logs until it ends; exit 1 unless it succeeds."),
    trust_code: bool = typer.Option(False, "--trust-code", help="With --command serve: serve a model that is your "
                                    "own code (model.kind python); its factory runs in the serving replicas."),
    profile_startup: bool = typer.Option(False, "--profile-startup", help="Print where the time went here "
                                         "(connect, upload, submit; with --follow the job to its end); the job "
                                         "prints its own phases in its logs."),
):
    """Run a job spec on a Ray cluster through Ray Job Submission."""
    from raybig.clusterspec import check_store
    from raybig.phases import Phases
    from raybig.store_io import join
    from raybig.submit import submit as submit_job

    phases = Phases() if profile_startup else None
    spec = _load(spec_path, set_)  # a bad spec fails here, before the cluster is contacted
    if phases:
        phases.mark("python, imports, spec")
    url, token, cluster = _target(cluster_file, address)
    where = store or (cluster.store if cluster else None)
    try:
        if not where:
            raise SpecError("give --store PATH_OR_URI (as the cluster sees it) or a cluster file with a store",
                            "--store")
        check_store(where, "--store")
        if command not in _command_names():  # the job runs this checkout's raybig: it must know the command
            raise SpecError(f"this raybig has no `{command}` command to run on the cluster", "--command")
        if command == "serve" and spec.model.kind == "python" and not trust_code:
            raise SpecError(f"{spec.name} is a python model: serving it runs {spec.model.factory} in the cluster's "
                            "replicas; pass --trust-code if you trust that code", "--trust-code")
        job_id = submit_job(spec_path, spec.name, url, token, where, set_ or [], command,
                            cluster.pip if cluster else None, trust_code, phases)
    except SpecError as error:
        _fail(error)
    out.print(f"[green]submitted[/]: {job_id} to {url} ({command}; model store {join(where, spec.name)})",
              highlight=False)
    target = f"--cluster {cluster_file}" if cluster_file else f"--address {url}"
    out.print(f"follow: raybig jobs logs {job_id} --follow {target}", highlight=False)
    try:
        if follow:
            jobs_logs(job_id, cluster_file, address, True)
    finally:
        if phases and follow:
            phases.mark("the job on the cluster, to its end (its own phases are in its logs)")
        if phases:
            err.print(phases.table("where the time went (here)"))


def _command_names() -> set[str]:
    return {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}


def _jobs_client(cluster_file, address):
    from raybig.submit import client

    url, token, _ = _target(cluster_file, address)
    try:
        return client(url, token), url
    except SpecError as error:
        _fail(error)


@jobs_app.command("list")
def jobs_list(cluster_file: Optional[str] = ClusterOption, address: Optional[str] = AddressOption):
    from rich.table import Table

    from raybig.submit import call

    c, url = _jobs_client(cluster_file, address)
    table = Table(title=f"jobs at {url}")
    for column in ("submission id", "status", "entrypoint"):
        table.add_column(column)
    try:
        jobs = call(c.list_jobs, where=url)
    except SpecError as error:
        _fail(error)
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        table.add_row(job.submission_id or job.job_id or "", str(job.status.value), job.entrypoint[:80])
    out.print(table)


@jobs_app.command("status")
def jobs_status(job_id: str, cluster_file: Optional[str] = ClusterOption, address: Optional[str] = AddressOption):
    from raybig.submit import call

    c, url = _jobs_client(cluster_file, address)
    try:
        info = call(c.get_job_info, job_id, where=url)
    except SpecError as error:
        _fail(error)
    out.print(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), highlight=False)


@jobs_app.command("logs")
def jobs_logs(job_id: str, cluster_file: Optional[str] = ClusterOption, address: Optional[str] = AddressOption,
              follow: bool = typer.Option(False, "--follow", "-f")):
    import asyncio

    from raybig.submit import call

    c, url = _jobs_client(cluster_file, address)
    try:
        if not follow:
            sys.stdout.write(call(c.get_job_logs, job_id, where=url))
            return

        async def tail():
            async for lines in c.tail_job_logs(job_id):
                sys.stdout.write(lines)
                sys.stdout.flush()

        asyncio.run(tail())
        status = call(c.get_job_status, job_id, where=url).value
    except SpecError as error:
        _fail(error)
    out.print(f"{job_id}: {status}", highlight=False)
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@jobs_app.command("stop")
def jobs_stop(job_id: str, cluster_file: Optional[str] = ClusterOption, address: Optional[str] = AddressOption):
    import time

    from raybig.submit import call

    c, url = _jobs_client(cluster_file, address)
    try:
        call(c.stop_job, job_id, where=url)
        for _ in range(120):
            status = call(c.get_job_status, job_id, where=url).value
            if status in ("STOPPED", "SUCCEEDED", "FAILED"):
                break
            time.sleep(0.5)
    except SpecError as error:
        _fail(error)
    out.print(f"{job_id}: {status}", highlight=False)


export_app = typer.Typer(help="Manifests for other ways of running a spec.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("kuberay")
def export_kuberay(
    spec_path: str = typer.Argument(..., metavar="SPEC"),
    set_: Optional[list[str]] = SetOption,
    out_dir: str = typer.Option("clusters/kuberay", "--out"),
    image: Optional[str] = typer.Option(None, help="An image with raybig installed (default: raybig:VERSION[-gpu], "
                                        "built from clusters/kuberay/Dockerfile)."),
    store_claim: Optional[str] = typer.Option(None, help="A PersistentVolumeClaim holding the model store, mounted "
                                              "at /models (default: raybig-models)."),
    store: Optional[str] = typer.Option(None, help="An s3:// or gs:// model store instead of a volume."),
    env_secret: Optional[str] = typer.Option(None, help="A Secret whose keys become environment variables in every "
                                             "pod (e.g. the object store's credentials)."),
):
    """Write a RayCluster sized for the spec's layout, a RayJob that trains it, and a RayService serving its model."""
    from raybig.kuberay import export

    spec = _load(spec_path, set_)
    try:
        written = export(spec, spec_path, out_dir, image, store_claim, store, env_secret, set_)
    except SpecError as error:
        _fail(error)
    for path in written:
        out.print(f"wrote {path}", highlight=False)


@app.command()
def pull(
    run_name: str = typer.Argument(..., metavar="NAME", help="The run's name (its directory in the store)."),
    cluster_file: Optional[str] = ClusterOption,
    store: Optional[str] = typer.Option(None, help="The store: a path, or an s3:// or gs:// URI."),
    to: str = typer.Option("runs", help="Where the run lands locally."),
):
    """Copy a finished run from a cluster's model store into the local one."""
    from raybig.store_io import pull_run

    where = store or (_cluster(cluster_file).store if cluster_file else None)
    if not where:
        _fail(SpecError("give --cluster FILE or --store PATH_OR_URI", "--store"))
    try:
        dest = pull_run(where, run_name, to)
    except SpecError as error:
        _fail(error)
    out.print(f"[green]pulled[/]: {dest}", highlight=False)


def main() -> None:  # pragma: no cover - console script entry
    """The command, then an immediate exit: once a command is done (its files written and closed, Ray
    stopped or left), the interpreter's own teardown of torch's and Ray's native state took another second
    here, for nothing (docs/benchmarks.md, start-up)."""
    import os

    try:
        app(prog_name="raybig")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
