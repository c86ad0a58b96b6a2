"""Regenerates docs/img/schedule_*.png, the timelines in docs/pipeline.md.

The order of operations on each rank is GPipe's (all forwards, then all backwards) and 1F1B's (warm-up
forwards, then one forward and one backward in turn, then the remaining backwards), and for interleaved 1F1B
the order torch's own schedule generates; the timeline is simulated with a
forward taking one time unit and a backward two, each starting once its inputs exist and its rank is free,
so the idle gaps (the bubble) show where they fall.

Run: python docs/schedule_pictures.py [--stages 4] [--microbatches 8]
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # noqa: E402

COST = {"F": 1, "B": 2}


def gpipe_order(rank, ranks, m):
    return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]


def one_f_one_b_order(rank, ranks, m):
    warmup = min(m, ranks - rank - 1)
    order = [("F", rank, i) for i in range(warmup)]
    for k in range(m - warmup):
        order += [("F", rank, warmup + k), ("B", rank, k)]
    return order + [("B", rank, i) for i in range(m - warmup, m)]


def interleaved_order(ranks, m, per_rank):
    ops = get_schedule_ops("Interleaved1F1B", ranks, m, num_stages_per_rank=per_rank)
    kinds = {"FORWARD": "F", "FULL_BACKWARD": "B"}
    return [[(kinds[a.computation_type.name], a.stage_index, a.microbatch_index) for a in rank
             if a is not None and a.computation_type.name in kinds] for rank in ops]


def timeline(queues, num_stages):
    """(rank, kind, stage, microbatch, start, end) for every forward and backward."""
    queues = [list(q) for q in queues]
    done, free, out = {}, [0] * len(queues), []
    while any(queues):
        progressed = False
        for rank, queue in enumerate(queues):
            if not queue:
                continue
            kind, stage, mb = queue[0]
            needs = [("F", stage - 1, mb)] if kind == "F" and stage > 0 else []
            if kind == "B":
                needs = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < num_stages - 1 else [])
            if all(n in done for n in needs):
                start = max([free[rank]] + [done[n] for n in needs])
                done[(kind, stage, mb)] = free[rank] = start + COST[kind]
                out.append((rank, kind, stage, mb, start, start + COST[kind]))
                queue.pop(0)
                progressed = True
        if not progressed:
            raise RuntimeError("the schedule's order cannot be simulated")
    return out


def draw(events, title, path):
    ranks = 1 + max(e[0] for e in events)
    end = max(e[5] for e in events)
    fig, ax = plt.subplots(figsize=(max(8, end * 0.32), 0.6 * ranks + 1.2))
    for rank, kind, stage, mb, start, stop in events:
        colour = "#3b6fd8" if kind == "F" else "#f0a030"
        ax.barh(rank, stop - start, left=start, color=colour, edgecolor="black", height=0.8)
        ax.text((start + stop) / 2, rank, f"{kind}{mb}" + (f"s{stage}" if stage >= ranks else ""),
                ha="center", va="center", fontsize=7, color="white" if kind == "F" else "black")
    busy = sum(e[5] - e[4] for e in events)
    ax.set(yticks=range(ranks), yticklabels=[f"rank {r}" for r in range(ranks)], xlabel="time (forward = 1)",
           title=f"{title}: busy {busy / (end * ranks):.0%} of rank-time")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args()
    out = Path(__file__).parent / "img"
    out.mkdir(exist_ok=True)
    p, m = args.stages, args.microbatches
    orders = {
        "gpipe": ([gpipe_order(r, p, m) for r in range(p)], p),
        "1f1b": ([one_f_one_b_order(r, p, m) for r in range(p)], p),
        "interleaved_1f1b": (interleaved_order(p, m, 2), 2 * p),
    }
    for name, (queues, stages) in orders.items():
        path = out / f"schedule_{name}.png"
        draw(timeline(queues, stages), f"{name}, {p} ranks, {m} microbatches", path)
        print(path)
