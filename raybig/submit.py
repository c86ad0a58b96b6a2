"""Running raybig on a Ray cluster: a local head (`raybig cluster up/down`) and Ray Job Submission
(`raybig submit`, `raybig jobs ...`). Every failure to reach or authenticate is a SpecError: one line, exit 2."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from raybig.clusterspec import ClusterSpec
from raybig.errors import SpecError

# Ray 2.60 clusters use token auth; Ray reads the mode when it is imported
os.environ.setdefault("RAY_AUTH_MODE", "token")

PROJECT_EXCLUDES = ["runs/", ".venv/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]


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


def client(address: str, token: str):
    from ray.job_submission import JobSubmissionClient

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


def cluster_up(cluster: ClusterSpec, timeout: float = 120) -> dict:
    """`ray start --head --block` in its own process group, so `down` ends exactly that group."""
    if cluster.head is None:
        raise SpecError("this cluster file has no head section: it describes a remote cluster", "head")
    state = _state_file(cluster)
    if state.exists():
        info = json.loads(state.read_text())
        if _alive(info["pgid"]):
            return info
    h = cluster.head
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--head", "--block", f"--node-ip-address={h.host}", f"--port={h.port}",
           f"--dashboard-host={h.host}", f"--dashboard-port={h.dashboard_port}",
           f"--ray-client-server-port={h.client_server_port}", f"--num-cpus={h.num_cpus}", f"--num-gpus={h.num_gpus}",
           "--disable-usage-stats"]
    log = state.with_suffix(".log").open("w")
    # jobs' entrypoints say `python`: make it this environment's, where raybig and torch are installed
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    info = {"pid": proc.pid, "pgid": os.getpgid(proc.pid), "address": cluster.submit_address,
            "gcs": f"{h.host}:{h.port}", "log": str(state.with_suffix(".log"))}
    state.write_text(json.dumps(info))
    deadline = time.time() + timeout
    token = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SpecError(f"ray start exited with {proc.returncode}; see {info['log']}", "head")
        try:
            token = token or resolve_token(cluster)
            call(client(cluster.submit_address, token).list_jobs, where=cluster.submit_address)
            return info
        except SpecError:
            time.sleep(1)
    cluster_down(cluster)
    raise SpecError(f"the head did not answer at {cluster.submit_address} within {timeout:.0f} s; see {info['log']}")


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def cluster_down(cluster: ClusterSpec, timeout: float = 30) -> bool:
    state = _state_file(cluster)
    if not state.exists():
        return False
    pgid = json.loads(state.read_text())["pgid"]
    if _alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _alive(pgid) and time.time() < deadline:
            time.sleep(0.5)
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    state.unlink()
    return True


# ----------------------------------------------------------------------------- jobs
def project_root(spec_path: Path) -> Path:
    """The directory shipped to the cluster: the one holding pyproject.toml above the spec (else its folder)."""
    for parent in [spec_path.resolve().parent, *spec_path.resolve().parents]:
        if (parent / "pyproject.toml").is_file():
            return parent
    return spec_path.resolve().parent


def entrypoint(command: str, spec_rel: str, overrides: list[str]) -> str:
    """An argument list, quoted piece by piece: spec fields never become shell syntax."""
    args = [command, spec_rel]
    if command == "run":
        args += ["--address", "auto"]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(["python", "-m", "raybig", *args])


def submit(spec_path: str, spec_name: str, address: str, token: str, store: str, overrides: list[str],
           command: str = "run", pip: list[str] | None = None) -> str:
    root = project_root(Path(spec_path))
    spec_rel = str(Path(spec_path).resolve().relative_to(root))
    job_id = f"{spec_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runtime_env = {"working_dir": str(root), "excludes": PROJECT_EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    c = client(address, token)
    call(c.submit_job, entrypoint=entrypoint(command, spec_rel, [f"output.dir={store}", *overrides]),
         submission_id=job_id, runtime_env=runtime_env, where=address)
    return job_id
