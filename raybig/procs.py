"""A process group this machine started (`ray start --head --block` for `raybig up` and `raybig cluster up`),
found again from the state file that names it, and ended: that group and what it started, nothing else."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def start_group(cmd: list[str], state: Path, env: dict, extra: dict) -> tuple[subprocess.Popen, dict]:
    """Start `cmd` in a process group of its own, its output in state's .log, and record it in `state`."""
    log_path = state.with_suffix(".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    info = {"pid": proc.pid, "pgid": os.getpgid(proc.pid), "start": start_time(proc.pid), **extra,
            "log": str(log_path)}
    state.write_text(json.dumps(info))
    return proc, info


def running(state: Path) -> dict | None:
    """The state file's record while the process it names is still that process, else None."""
    if not state.exists():
        return None
    try:
        info = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    if info.get("start") is not None and start_time(info["pid"]) == info["start"]:
        return info
    return None


def stat_of(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, process group, start time) of a process, from Linux /proc; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def start_time(pid: int) -> int | None:
    stat = stat_of(pid)
    return stat[3] if stat and stat[0] != "Z" else None


def _processes() -> dict[int, tuple[str, int, int, int]]:
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = stat_of(int(entry.name))
        if stat:
            found[int(entry.name)] = stat
    return found


def _alive(pgid: int) -> bool:
    """Whether the group has a live member (a zombie nobody reaped does not count)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    return any(state != "Z" and group == pgid for state, _, group, _ in _processes().values())


def _descendants(pid: int) -> dict[int, int]:
    """Every process below `pid`, with its start time: Ray gives job drivers sessions of their own, so the
    head's process group alone does not reach them."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for child, (_, parent, _, _) in procs.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = procs[child][3]
            todo.append(child)
    return found


def end_group(state: Path, timeout: float = 10) -> bool:
    """SIGTERM the recorded process group and the processes it started in sessions of their own, then SIGKILL
    whatever is left after `timeout` (the GCS server, for one, lingers on SIGTERM; like `ray stop`, give it a
    grace period, then kill). A pid is signalled only while it is still the process found at first."""
    if not state.exists():
        return False
    info = json.loads(state.read_text())
    pgid, leader = info["pgid"], stat_of(info["pid"])
    if leader is not None and leader[3] != info.get("start"):  # the pid is another process now: ours is gone
        state.unlink()
        return True
    started = _descendants(info["pid"]) if leader is not None else {}

    def ours() -> list[int]:
        alive = ((p, stat_of(p)) for p in started)
        return [p for p, stat in alive if stat and stat[0] != "Z" and stat[3] == started[p]]

    def signal_all(sig) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        for p in ours():
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.time() + timeout
    while (_alive(pgid) or ours()) and time.time() < deadline:
        time.sleep(0.5)
    # a SIGKILLed process takes a moment to exit, and one forked meanwhile missed the signal: the group is down
    # only once none of it is left (a caller checking at once had found it still there)
    deadline = time.time() + timeout
    signal_all(signal.SIGKILL)
    while (_alive(pgid) or ours()) and time.time() < deadline:
        time.sleep(0.1)
        signal_all(signal.SIGKILL)
    state.unlink()
    return True
