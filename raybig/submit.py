"""Running raybig on a Ray cluster: a local head (`raybig cluster up/down`) and Ray Job Submission
(`raybig submit`, `raybig jobs ...`). Every failure to reach or authenticate is a SpecError: one line, exit 2."""
from __future__ import annotations

import logging
import os
import secrets
import shlex
import sys
import time
from pathlib import Path

from raybig.clusterspec import ClusterSpec
from raybig.errors import SpecError
from raybig.procs import end_group, running, start_group
from raybig.store_io import is_uri, join

PROJECT_EXCLUDES = ["runs/", ".venv/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]
# What `raybig submit --command` can run on the cluster. run and sweep take the spec and write into the
# store; serve serves the run the spec trained, from the store.
COMMANDS = ("run", "sweep", "serve")


# ----------------------------------------------------------------------------- auth
def resolve_token(cluster: ClusterSpec | None) -> str:
    """RAY_AUTH_TOKEN (or the cluster file's token_env), then RAY_AUTH_TOKEN_PATH or the cluster file's
    token_path, then ~/.ray/auth_token, where `ray start` keeps it."""
    env_name = cluster.auth.token_env if cluster else "RAY_AUTH_TOKEN"
    if os.environ.get(env_name):
        return os.environ[env_name].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or (cluster.auth.token_path if cluster else None)
    where = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    if not where.is_file():
        raise SpecError(f"no Ray auth token: set {env_name}, or RAY_AUTH_TOKEN_PATH, or put it in {where}", "auth")
    return where.read_text().strip()


# Ray's client logs every file it leaves out of the upload and every websocket it closes (INFO), and that
# it now leaves .git out (a WARNING about what PROJECT_EXCLUDES asks anyway)
QUIET_LOGGERS = {"ray.dashboard.modules.dashboard_sdk": logging.WARNING, "ray.dashboard.modules.job.sdk": logging.WARNING,
                 "ray._private.runtime_env.packaging": logging.WARNING,
                 "ray._private.runtime_env.working_dir": logging.ERROR}


def client(address: str, token: str):
    from ray.job_submission import JobSubmissionClient

    for name, level in QUIET_LOGGERS.items():  # after the import: those modules set their own level when loaded
        logging.getLogger(name).setLevel(level)
    return call(JobSubmissionClient, address, headers={"Authorization": f"Bearer {token}"}, where=address)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _auth_or(err: BaseException, address: str) -> str:
    text = str(err)
    if "401" in text or "403" in text or "Unauthorized" in text or "Forbidden" in text:
        return f"the cluster at {address} refused the auth token (check RAY_AUTH_TOKEN)"
    return f"the cluster at {address} answered with an error: {_first_line(err)}"


def call(fn, *args, where: str, **kwargs):
    """A JobSubmissionClient call (or its construction), with Ray's errors turned into one clear line
    about the cluster at `where`."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except ConnectionError as err:
        raise SpecError(f"cannot reach a Ray cluster at {where} ({_first_line(err)})", "--address") from None
    except AuthenticationError:
        raise SpecError(f"the cluster at {where} refused the auth token (check RAY_AUTH_TOKEN)", "auth") from None
    except RuntimeError as err:
        raise SpecError(_auth_or(err, where)) from None


# ----------------------------------------------------------------------------- a local head
def _state_file(cluster: ClusterSpec) -> Path:
    from raybig.data.datasets import cache_dir

    d = cache_dir() / "clusters"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{cluster.name}.json"


def head_command(cluster: ClusterSpec) -> list[str]:
    h = cluster.head
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           f"--node-ip-address={h.host}", f"--port={h.port}", f"--dashboard-host={h.host}",
           f"--dashboard-port={h.dashboard_port}", f"--ray-client-server-port={h.client_server_port}",
           f"--num-cpus={h.num_cpus}", f"--num-gpus={h.num_gpus}", "--disable-usage-stats"]
    if h.temp_dir:
        cmd.append(f"--temp-dir={Path(h.temp_dir).expanduser()}")
    return cmd


def cluster_up(cluster: ClusterSpec, timeout: float = 120) -> dict:
    """`ray start --head --block` in its own process group, so `down` ends exactly that group."""
    if cluster.head is None:
        raise SpecError("this cluster file has no head section: it describes a remote cluster", "head")
    state = _state_file(cluster)
    info = running(state)
    if info is not None:
        return info  # already up
    # jobs' entrypoints say `python`: make it this environment's, where raybig and torch are installed
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc, info = start_group(head_command(cluster), state, env,
                             {"address": cluster.submit_address, "gcs": f"{cluster.head.host}:{cluster.head.port}"})
    log_path = info["log"]
    deadline = time.time() + timeout
    token = None
    while time.time() < deadline:
        if proc.poll() is not None:
            state.unlink(missing_ok=True)
            raise SpecError(f"ray start exited with {proc.returncode}; see {log_path}", "head")
        try:
            token = token or resolve_token(cluster)
            call(client(cluster.submit_address, token).list_jobs, where=cluster.submit_address)
            return info
        except SpecError:
            time.sleep(1)
    cluster_down(cluster)
    raise SpecError(f"the head did not answer at {cluster.submit_address} within {timeout:.0f} s; see {log_path}")


def cluster_down(cluster: ClusterSpec, timeout: float = 10) -> bool:
    """Stop the head `cluster_up` started (raybig.procs.end_group)."""
    return end_group(_state_file(cluster), timeout)


# ----------------------------------------------------------------------------- jobs
def project_root(spec_path: Path) -> Path:
    """The directory shipped to the cluster: the one holding pyproject.toml above the spec (else its folder)."""
    for parent in [spec_path.resolve().parent, *spec_path.resolve().parents]:
        if (parent / "pyproject.toml").is_file():
            return parent
    return spec_path.resolve().parent


def entrypoint_args(command: str, spec_rel: str, name: str, store: str, overrides: list[str],
                    trust_code: bool = False, profile: bool = False) -> list[str]:
    """The job's command as an argument list; spec fields and overrides are single arguments, never shell syntax.

    run and sweep read the spec (shipped in the working directory) and write into the cluster's store;
    serve serves the run `name` from the store (a path the cluster's nodes see, or an object store), with
    --trust-code when the caller gave it (a python model's factory then runs in the serving replicas).
    `profile`: the job prints where its own time went (--profile-startup), in its logs."""
    if command not in COMMANDS:
        raise SpecError(f"{command!r} is not one of: {', '.join(COMMANDS)}", "--command")
    if command == "sweep" and is_uri(store):
        raise SpecError(f"a sweep keeps its trials on a path every node sees, not in {store}; use a path store",
                        "--store")
    if command == "serve":
        if any(not item.startswith("name=") for item in overrides):
            raise SpecError("serve takes the run as it was trained: only --set name=... (which run) applies",
                            "--set")
        return ["python", "-m", "raybig", "serve", join(store, name), "--address", "auto",
                *(["--trust-code"] if trust_code else []), *(["--profile-startup"] if profile else [])]
    args = ["python", "-m", "raybig", command, spec_rel, "--address", "auto", "--set", f"output.dir={store}"]
    for item in overrides:
        args += ["--set", item]
    return args + (["--profile-startup"] if profile else [])


def entrypoint(command: str, spec_rel: str, name: str, store: str, overrides: list[str],
               trust_code: bool = False, profile: bool = False) -> str:
    """Ray runs the entrypoint through a shell: every piece is quoted."""
    return shlex.join(entrypoint_args(command, spec_rel, name, store, overrides, trust_code, profile))


def submission_id(name: str) -> str:
    """The spec's name and the time, and a few random characters so two submissions in one second differ."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _submit_when_an_agent_is_up(c, wait_s: float = 60.0, **job) -> str:
    """A head that has just started answers "No available agent to submit job" until its node's job agent is
    up (seconds, more on a busy machine): such a refusal is waited out, for `wait_s` at most."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return c.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def submit(spec_path: str, spec_name: str, address: str, token: str, store: str, overrides: list[str],
           command: str = "run", pip: list[str] | None = None, trust_code: bool = False, phases=None) -> str:
    """Submit the job; `phases` (raybig.phases.Phases), when given, marks each step and has the job profile
    itself."""
    root = project_root(Path(spec_path))
    spec_rel = Path(spec_path).resolve().relative_to(root).as_posix()
    line = entrypoint(command, spec_rel, spec_name, store, overrides, trust_code, profile=phases is not None)
    job_id = submission_id(spec_name)
    runtime_env = {"working_dir": str(root), "excludes": PROJECT_EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    c = client(address, token)
    if phases is not None:
        phases.mark("connect to the cluster's job server")
    call(_submit_when_an_agent_is_up, c, entrypoint=line, submission_id=job_id, runtime_env=runtime_env,
         where=address)
    if phases is not None:
        phases.mark("pack and upload the working directory, submit")
    return job_id
