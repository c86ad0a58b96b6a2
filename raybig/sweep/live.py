"""The driver's live view of a sweep: one row per trial (status, epoch, metric, config), redrawn as Tune
reports, and a line per trial that ends, for logs that are not a terminal."""
from __future__ import annotations

import math

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

STATUS_STYLE = {"RUNNING": "yellow", "TERMINATED": "green", "ERROR": "red", "PENDING": "dim", "PAUSED": "cyan"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


class LiveTable(Callback):
    def __init__(self, spec, console: Console | None):
        self.spec, self.console = spec, console or Console(stderr=True)
        self.live: Live | None = None
        self.trials: list = []

    def __getstate__(self):
        # Tune saves its callbacks with the experiment (for --resume); a console and a live display don't pickle
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"], None)

    def render(self) -> Table:
        sweep = self.spec.sweep
        table = Table(title=f"sweep {self.spec.name}: {sweep.metric} ({sweep.goal}), scheduler {sweep.scheduler.name}",
                      header_style="bold", show_edge=False)
        for column in ("trial", "status", "epoch", sweep.metric, *sweep.space):
            table.add_column(column.removeprefix("train."), justify="right")
        for trial in self.trials:
            result = trial.last_result or {}
            table.add_row(trial.trial_id, f"[{STATUS_STYLE.get(trial.status, '')}]{trial.status}[/]",
                          _fmt(result.get("epoch", "")), _fmt(result.get(sweep.metric, "")),
                          *[_fmt(trial.config.get(p, "")) for p in sweep.space])
        return table

    def _redraw(self, trials) -> None:
        self.trials = trials
        if not self.console.is_terminal:  # a log gets a line per ended trial instead
            return
        if self.live is None:
            self.live = Live(self.render(), console=self.console, auto_refresh=False, transient=False)
            self.live.start()
        self.live.update(self.render(), refresh=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._redraw(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._redraw(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "failed")

    def _ended(self, trials, trial, how: str) -> None:
        self._redraw(trials)
        if not self.console.is_terminal:
            result = trial.last_result or {}
            self.console.print(f"trial {trial.trial_id} {how}: epoch {result.get('epoch', 0)}, "
                               f"{self.spec.sweep.metric} {_fmt(result.get(self.spec.sweep.metric, float('nan')))}",
                               highlight=False)

    def on_experiment_end(self, trials, **info):
        self.close(trials)

    def close(self, trials=None) -> None:
        if self.live is not None:
            if trials is not None:
                self.trials = trials
            self.live.update(self.render(), refresh=True)
            self.live.stop()
            self.live = None
