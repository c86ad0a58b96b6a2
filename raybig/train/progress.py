"""What the user watches: a live step bar and a row per epoch on the driver, and curves in the run directory."""
from __future__ import annotations

import shutil
from pathlib import Path

import ray
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Rank 0 posts here without waiting; the driver drains it. Works the same on a remote cluster.

    In a sweep trial it also carries the trial's word at the epochs where Tune's scheduler may stop it
    (raybig.train.group.TrialGate): rank 0 waits for it there, the trial's thread gives it. An async actor,
    so a rank waiting for its word never blocks a push or a drain."""

    def __init__(self):
        import asyncio

        self.items: list[dict] = []
        self.words: dict[int, asyncio.Future] = {}
        self.refused = False

    async def push(self, item: dict) -> None:
        self.items.append(item)

    async def drain(self) -> list[dict]:
        items, self.items = self.items, []
        return items

    def _word(self, epoch: int):
        import asyncio

        return self.words.setdefault(epoch, asyncio.get_running_loop().create_future())

    async def word_for(self, epoch: int) -> bool:
        """Whether the trial goes on after `epoch`: waits until the trial says."""
        if self.refused:
            return False
        go = await self._word(epoch)
        self.words.pop(epoch, None)
        return go

    async def give_word(self, epoch: int, go: bool) -> None:
        word = self._word(epoch)
        if not word.done():
            word.set_result(go)

    async def refuse_all(self) -> None:
        """The trial is over: at every epoch, waited for now or later, the answer is stop."""
        self.refused = True
        for word in self.words.values():
            if not word.done():
                word.set_result(False)

    async def forget(self) -> None:
        """Ready for the next trial of the same actor: no items or words of the last one left."""
        self.items, self.words, self.refused = [], {}, False


COLUMNS = [("epoch", "epoch", "{:d}"), ("step", "step", "{:d}"), ("train_loss", "train loss", "{:.4f}"),
           ("val_loss", "val loss", "{:.4f}"),
           ("val_accuracy", "val acc", "{:.2%}"), ("val_precision", "val prec", "{:.3f}"),
           ("val_recall", "val recall", "{:.3f}"), ("val_f1", "val f1", "{:.3f}"), ("samples_per_s", "samples/s", "{:,.0f}")]


# a language model's accuracy is per token, and perplexity says more than precision and recall over a vocabulary
LM_COLUMNS = [*COLUMNS[:4], ("val_perplexity", "val ppl", "{:.2f}"), ("val_token_accuracy", "token acc", "{:.2%}"),
              ("tokens_per_s", "tokens/s", "{:,.0f}")]


REGRESSION_COLUMNS = [*COLUMNS[:4], ("val_mse", "val mse", "{:.4g}"), ("val_mae", "val mae", "{:.4g}"),
                      COLUMNS[-1]]


def epoch_table(history: list[dict], title: str | None = None) -> Table:
    table = Table(title=title, show_edge=False, header_style="bold")
    first = history[0] if history else {}
    columns = LM_COLUMNS if "val_perplexity" in first else REGRESSION_COLUMNS if "val_mse" in first else COLUMNS
    for _, header, _ in columns:
        table.add_column(header, justify="right", width=10)  # fixed, so rows printed one at a time line up
    for record in history:
        table.add_row(*[fmt.format(record[name]) if name in record else "-" for name, _, fmt in columns])
    return table


class ProgressView:
    def __init__(self, spec, console: Console | None, resumed_at: tuple[int, int] = (0, 0),
                 damaged: list[str] = ()):
        """`damaged`: the checkpoints newer than the one resumed from that failed their check, and why."""
        self.spec, self.console = spec, console or Console(stderr=True)
        # a run of train.max_steps shows its steps; one of epochs, the steps of the epoch it is in
        label = "step" if spec.train.max_steps else "epoch {task.fields[epoch]}/{task.fields[epochs]}"
        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
        self.task = None
        self.header_done = False
        epochs, steps = resumed_at
        for line in damaged:
            self.console.print(f"[yellow]{escape(line)}[/]", highlight=False)
        if damaged and not steps:
            self.console.print("[yellow]no checkpoint before it checks out: training from the start[/]")
        if steps:
            self.console.print(f"[yellow]resuming from the checkpoint at step {steps} ({epochs} whole epochs)[/]")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def handle(self, item: dict) -> None:
        if item["type"] == "step":
            fields = {"epoch": item["epoch"], "epochs": self.spec.train.epochs, "loss": item["loss"]}
            done, total = (item["global_step"], item["total_steps"]) if self.spec.train.max_steps else \
                (item["step"], item["steps"])
            if self.task is None:
                self.task = self.progress.add_task("train", total=total, **fields)
            self.progress.update(self.task, completed=done, total=total, **fields)
        elif item["type"] == "epoch":
            table = epoch_table([item])
            table.show_header = not self.header_done
            self.header_done = True
            self.progress.console.print(table)
        elif item["type"] == "restart":
            # the reason is a worker's error text, which may hold brackets (gloo's "[.../pair.cc:537]")
            self.progress.console.print(f"[yellow]a worker failed ({escape(item['reason'])}); restarting the workers "
                                        f"from the last checkpoint (failure {item['failures']} of "
                                        f"{self.spec.failure.max_failures} allowed)[/]")


def write_curves(root: Path, history: list[dict]) -> None:
    """curves.png and TensorBoard event files, regenerated from the whole history (so resumed runs stay tidy)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    at = [r["step"] for r in history]  # records come at epoch ends, or every eval.every_steps
    steps = [s for r in history for s in r.get("step_losses", [])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(range(1, len(steps) + 1), steps, lw=0.8)
    axes[0].set(title="train loss per step", xlabel="step")
    axes[1].plot(at, [r["train_loss"] for r in history], "o-", label="train")
    axes[1].plot(at, [r["val_loss"] for r in history], "o-", label="validation")
    axes[1].set(title="loss", xlabel="step")
    axes[1].legend()
    for name in _present(history, "val_accuracy", "val_precision", "val_recall", "val_f1", "val_token_accuracy",
                         "val_mae"):
        axes[2].plot(at, [r[name] for r in history], "o-", label=name[4:])
    axes[2].set(title="validation metrics", xlabel="step")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=90)
    plt.close(fig)

    tb = root / "tensorboard"
    shutil.rmtree(tb, ignore_errors=True)
    with SummaryWriter(str(tb)) as writer:
        for i, loss in enumerate(steps, 1):
            writer.add_scalar("train/step_loss", loss, i)
        for r in history:
            for name in _present([r], "train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall",
                                 "val_f1", "val_perplexity", "val_token_accuracy", "val_mse", "val_mae", "lr",
                                 "samples_per_s",
                                 "tokens_per_s"):
                writer.add_scalar(name.replace("_", "/", 1) if name.startswith("val_") else f"train/{name}",
                                  r[name], r["step"])


def _present(history: list[dict], *names: str) -> list[str]:
    """The metrics every record has: a classifier's and a language model's differ."""
    return [n for n in names if all(n in r for r in history)]
