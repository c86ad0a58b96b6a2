"""Where a command's time goes before, around and after the work it was asked for (`--profile-startup`).

Marks are wall-clock times (`time.time()`), so a rank's marks, taken in its own process, line up with the
driver's; on one node exactly, across nodes within their clocks' skew. A phase is the time from one mark
to the next.
"""
from __future__ import annotations

import time


def process_started() -> float:
    """When this process started (the interpreter, before any import), from the OS."""
    import psutil

    return psutil.Process().create_time()


class Phases:
    """Named marks in the order they happen; `mark(name)` closes the phase `name` now (or `at`)."""

    def __init__(self, start: float | None = None, start_name: str = "process start"):
        self.marks: list[tuple[str, float]] = [(start_name, process_started() if start is None else start)]
        self.facts: dict = {}  # what else the profile records, e.g. which process ran rank 0

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.append((name, time.time() if at is None else at))

    def durations(self) -> list[tuple[str, float]]:
        """(phase, seconds) for each mark after the first, in time order."""
        ordered = sorted(self.marks, key=lambda mark: mark[1])
        return [(name, at - before) for (_, before), (name, at) in zip(ordered, ordered[1:])]

    def total(self) -> float:
        return max(at for _, at in self.marks) - self.marks[0][1]

    def to_dict(self) -> dict:
        return {"started_at": self.marks[0][1], "total_seconds": round(self.total(), 4), **self.facts,
                "phases": [{"phase": name, "seconds": round(s, 4)} for name, s in self.durations()]}

    def table(self, title: str, work: tuple[str, ...] = ()):
        """A rich table of the phases; those named in `work` (training itself) are set apart from the
        overhead around them."""
        from rich.table import Table

        table = Table(title=title, show_edge=False, header_style="bold")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        overhead = 0.0
        for name, seconds in self.durations():
            table.add_row(name, f"{seconds:.2f}")
            overhead += 0.0 if name in work else seconds
        table.add_row("[bold]total[/]", f"[bold]{self.total():.2f}[/]")
        if work:
            table.add_row("[bold]overhead (all but the work)[/]", f"[bold]{overhead:.2f}[/]")
        return table


def trial_phases_table(trials_dir):
    """Each phase of a sweep's trials (their startup.json, raybig.sweep.trial): median, largest and sum over
    the trials that went through it; a trial stopped early has no "training" or later phases."""
    import json
    import statistics
    from pathlib import Path

    from rich.table import Table

    seconds: dict[str, list[float]] = {}
    files = sorted(Path(trials_dir).glob("*/startup.json"))
    for path in files:
        for phase in json.loads(path.read_text())["phases"]:
            seconds.setdefault(phase["phase"], []).append(phase["seconds"])
    table = Table(title=f"where the trials' time went ({len(files)} trials)", show_edge=False, header_style="bold")
    for column in ("phase", "trials", "median s", "largest s", "sum s"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name, values in seconds.items():
        table.add_row(name, str(len(values)), f"{statistics.median(values):.2f}", f"{max(values):.2f}",
                      f"{sum(values):.1f}")
    return table


def phase_item(name: str) -> dict:
    """A mark the driver's side of a run posts to its progress handler (the ranks post theirs the same way)."""
    return {"type": "phase", "name": name, "at": time.time()}


class RankMarks:
    """Wraps a run's progress handler to take the marks into `phases`: the driver's (`phase_item`) and the
    ranks' own (their items carry `at`): set-up done, the first step done, the last step done."""

    def __init__(self, phases: Phases, handle, epochs: int):
        self.phases, self.handle, self.epochs = phases, handle, epochs
        self.first_step = None

    def __call__(self, item: dict) -> None:
        if item["type"] == "phase":
            self.phases.mark(item["name"], item["at"])
            return
        if item["type"] == "ready":
            self.phases.mark("rank set-up: data, model, process group", item["at"])
            self.phases.facts["rank0_pid"] = item.get("pid")
        elif item["type"] == "step" and "at" in item:
            if self.first_step is None:
                self.first_step = item["at"]
                self.phases.mark("first step", item["at"])
            elif item["epoch"] == self.epochs and item["step"] == item["steps"]:
                self.phases.mark("training (steps after the first, evaluation, checkpoints)", item["at"])
        if self.handle is not None:
            self.handle(item)
