"""Compression of a trained run into a new run that `raybig serve` serves as it serves any other.

- quantize: Linear and LSTM weight matrices stored as int8 (one scale per output row); loaded, the model is
  turned into torch's dynamically quantized one (int8 weights, activations quantized on the fly).
- prune: the smallest weights set to zero (one threshold over the whole model, or one per layer), then a
  short fine-tune (a run with init_from.keep_zeros) so the rest make up for them.
- low_rank: each Linear layer W (out x in) replaced by two, of rank r, from W's SVD; by a given rank, or the
  smallest that keeps a given fraction of W's energy (sum of squared singular values). A layer that would not
  get smaller stays as it is.

What was done is recorded in model.json ("compression"), which is how the model is rebuilt for loading
(`prepare` before the weights go in, `finish` after), and beside it, with the parent run.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

METHODS = ("quantize", "prune", "low_rank")
SCALE = ".int8_scale"  # the suffix of a quantized weight's row scales in model.safetensors
PRUNED = "pruned.safetensors"  # a pruned model before its fine-tune


# ----------------------------------------------------------------------------- quantize
def _quantized_weights(model: nn.Module) -> list[str]:
    """The weight matrices dynamic quantization covers: Linear layers' and LSTM layers'."""
    names = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, nn.Linear):
            names.append(f"{prefix}weight")
        elif isinstance(module, nn.LSTM):
            names += [f"{prefix}{n}" for n, _ in module.named_parameters() if n.startswith("weight_")]
    return names


def quantize_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = _quantized_weights(model)
    for name in names:
        w = state[name].float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        state[name] = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        state[name + SCALE] = scale.squeeze(1)
    return state, {"method": "quantize", "dtype": "int8", "weights": len(names)}


def _dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(SCALE):
            continue
        scale = state.get(key + SCALE)
        out[key] = value.float() * scale.unsqueeze(1) if scale is not None else value
    return out


def _dynamic_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear, nn.LSTM}, dtype=torch.qint8)


# ----------------------------------------------------------------------------- prune
def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weight matrices and kernels of Linear, convolution and LSTM layers (not embeddings, norms or biases)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM)
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, kinds):
            prefix = f"{path}." if path else ""
            for name, param in module.named_parameters(recurse=False):
                if param.dim() > 1:
                    out[prefix + name] = param
    return out


@torch.no_grad()
def prune_state(model: nn.Module, sparsity: float, scope: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Zero the `sparsity` fraction of smallest-magnitude prunable weights: over them all (global) or in each
    weight on its own (layer)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = prunable(model)
    if scope == "global":
        magnitudes = torch.cat([state[n].abs().reshape(-1) for n in weights])
        k = int(sparsity * magnitudes.numel())
        threshold = magnitudes.kthvalue(k).values if k else magnitudes.new_tensor(-1.0)
        for name in weights:
            state[name][state[name].abs() <= threshold] = 0
    else:
        for name in weights:
            w = state[name]
            k = int(sparsity * w.numel())
            if k:
                w[w.abs() <= w.abs().reshape(-1).kthvalue(k).values] = 0
    zeros = sum(int((state[n] == 0).sum()) for n in weights)
    total = sum(state[n].numel() for n in weights)
    return state, {"method": "prune", "sparsity": sparsity, "scope": scope, "achieved": zeros / max(total, 1)}


# ----------------------------------------------------------------------------- low rank
class LowRankLinear(nn.Module):
    """x -> up(down(x)): a Linear layer of rank `rank`, with (in + out) x rank weights instead of in x out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear) and path}


def chosen_ranks(model: nn.Module, rank: int | None, energy: float | None) -> dict[str, int]:
    """Per Linear layer, the rank to keep; layers that factorised would not be smaller are left out."""
    ranks = {}
    for path, layer in _linears(model).items():
        out_f, in_f = layer.weight.shape
        if rank is not None:
            r = rank
        else:
            s = torch.linalg.svdvals(layer.weight.detach().float())
            kept = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
            r = int((kept < energy).sum()) + 1
        if r * (in_f + out_f) < in_f * out_f:
            ranks[path] = r
    return ranks


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def factorise(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """`model` with the named Linear layers replaced by (untrained) LowRankLinear ones, in place."""
    for path, r in ranks.items():
        layer = model.get_submodule(path)
        _set_module(model, path, LowRankLinear(layer.in_features, layer.out_features, r, layer.bias is not None))
    return model


@torch.no_grad()
def low_rank_state(model: nn.Module, rank: int | None, energy: float | None) -> tuple[dict, dict]:
    ranks = chosen_ranks(model, rank, energy)
    factors = {}
    for path, r in ranks.items():
        u, s, vh = torch.linalg.svd(model.get_submodule(path).weight.detach().float(), full_matrices=False)
        root = s[:r].sqrt()
        factors[path] = (vh[:r] * root[:, None], u[:, :r] * root[None, :])
    factorise(model, ranks)
    for path, (down, up) in factors.items():
        layer = model.get_submodule(path)
        layer.down.weight.copy_(down)
        layer.up.weight.copy_(up)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {"method": "low_rank", "ranks": ranks, **({"rank": rank} if rank else {"energy": energy})}


# ----------------------------------------------------------------------------- loading
def prepare(model: nn.Module, compression: dict | None) -> nn.Module:
    """The model built from its spec, shaped as the compressed weights need before they are loaded."""
    if compression and compression["method"] == "low_rank":
        return factorise(model, compression["ranks"])
    return model


def decoded(state: dict[str, torch.Tensor], compression: dict | None) -> dict[str, torch.Tensor]:
    return _dequantized(state) if compression and compression["method"] == "quantize" else state


def finish(model: nn.Module, compression: dict | None) -> nn.Module:
    """The loaded model as it is served: int8 kernels for a quantized one."""
    if compression and compression["method"] == "quantize":
        return _dynamic_int8(model.eval())
    return model


# ----------------------------------------------------------------------------- the command
def default_name(parent: str, method: str, sparsity: float, rank: int | None, energy: float | None) -> str:
    if method == "quantize":
        return f"{parent}-int8"
    if method == "prune":
        return f"{parent}-pruned{round(sparsity * 100)}"
    return f"{parent}-rank{rank}" if rank else f"{parent}-energy{round(energy * 100)}"


def compressed_run(parent: Path, target: Path, method: str, *, sparsity: float = 0.8, scope: str = "global",
                   rank: int | None = None, energy: float | None = None, trust_code: bool = False) -> dict:
    """Write `target`, a run holding the compressed model of `parent`, and return the compression record. A
    pruned model is written to target/pruned.safetensors for its fine-tune (`finetune_spec`) to start from."""
    from safetensors.torch import save_file

    from raybig.train.checkpoint import RunStore, load_trained_model

    model, info = load_trained_model(parent, trust_code=trust_code)
    if info.get("compression"):
        raise ValueError(f"{parent} is compressed already ({info['compression']['method']}); compress its parent "
                         f"{info['compression'].get('parent', '')}")
    if method == "quantize":
        state, record = quantize_state(model)
    elif method == "prune":
        state, record = prune_state(model, sparsity, scope)
    else:
        state, record = low_rank_state(model, rank, energy)
        if not record["ranks"]:
            raise ValueError("no Linear layer gets smaller at that rank or energy: lower --rank or --energy")
    record["parent"] = str(parent.resolve())
    shutil.rmtree(target, ignore_errors=True)
    store = RunStore(target)
    store.publish_model(state, {**info, "name": target.name, "compression": record})
    if method == "prune":
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / PRUNED))
    for name in ("spec.yaml", "tokenizer.json"):  # what serving and a fine-tune read beside the weights
        if (parent / name).is_file():
            shutil.copy2(parent / name, target / name)
    return record


def finetune_spec(target: Path, epochs: int):
    """The parent's spec, training `epochs` more from the pruned weights with their zeros kept, into target."""
    from raybig.spec import load_spec, parse_spec, set_path

    raw = load_spec(target / "spec.yaml").model_dump(mode="json", exclude={"sweep", "distill", "init_from"})
    for path, value in (("name", target.name), ("output.dir", str(target.parent)), ("train.epochs", epochs),
                        ("train.max_steps", None), ("eval.every_steps", None), ("checkpoint.every_steps", None),
                        ("init_from", {"source": str(target / PRUNED), "keep_zeros": True}),
                        ("tracking.enabled", False)):  # the compressed run is tracked whole, at the end
        raw = set_path(raw, path, value)
    return parse_spec(raw)


def mark_compressed(target: Path, record: dict) -> None:
    """After the fine-tune published its model: its model.json says what it is."""
    info = json.loads((target / "model.json").read_text())
    (target / "model.json").write_text(json.dumps({**info, "compression": record}, indent=1))


def compress(parent: Path, target: Path, method: str, *, finetune_epochs: int = 2, num_cpus: float | None = None,
             console=None, trust_code: bool = False, **options) -> tuple[dict, list[dict]]:
    """`raybig compress`: the compressed run (a pruned one fine-tuned on the embedded or running Ray), its
    comparison with the parent in compression.json and compression.png; returns (record, rows)."""
    record = compressed_run(parent, target, method, trust_code=trust_code, **options)
    if method == "prune" and finetune_epochs:
        from raybig.train.runner import run

        if console is not None:
            console.print(f"pruned to {record['achieved']:.1%} zeros; fine-tuning {finetune_epochs} epoch(s) with "
                          "them kept")
        run(finetune_spec(target, finetune_epochs), num_cpus=num_cpus, console=console)
        mark_compressed(target, record)
    rows = comparison({parent.name: parent, target.name: target}, trust_code=trust_code)
    (target / "compression.json").write_text(json.dumps({**record, "comparison": rows}, indent=1))
    plot(rows, target / "compression.png")
    _track(parent, target, console)
    return record, rows


def _track(parent: Path, target: Path, console) -> None:
    """Into MLflow as the parent's spec says its runs go (a failing store only warns)."""
    from raybig.lifecycle.registry import Tracker, tracking_uri
    from raybig.spec import load_spec

    if not (parent / "spec.yaml").is_file():
        return
    spec = load_spec(parent / "spec.yaml")
    uri = tracking_uri(spec)
    if uri is not None:
        Tracker(uri, spec.tracking.experiment).finish(target, console)


# ----------------------------------------------------------------------------- the comparison
def _batch_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    import time

    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from raybig.data.documents import IGNORE

    right = counted = 0
    with torch.no_grad():
        for i in range(0, len(x), 256):
            preds, labels = model(x[i:i + 256]).argmax(-1), y[i:i + 256]
            mask = labels != IGNORE
            right += int((preds == labels)[mask].sum())
            counted += int(mask.sum())
    return right / max(counted, 1)


def comparison(runs: dict[str, Path], batch_size: int = 64, trust_code: bool = False) -> list[dict]:
    """Each run's parameters (and how many are not zero), bytes on disk, CPU latency of one batch (median)
    and accuracy on the parent's validation split (the first run's spec.yaml says which data that is)."""
    from safetensors import safe_open

    from raybig.data.datasets import load
    from raybig.spec import load_spec
    from raybig.train.checkpoint import load_trained_model

    first = next(iter(runs.values()))
    spec = load_spec(first / "spec.yaml")
    val = load(spec.data, spec.model).val
    x, y = torch.as_tensor(val.x[:4096]), torch.as_tensor(val.y[:4096])
    rows = []
    for label, run in runs.items():
        model, _ = load_trained_model(run, trust_code=trust_code)
        params = nonzero = 0
        with safe_open(str(run / "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                if not key.endswith(SCALE):
                    t = f.get_tensor(key)
                    params, nonzero = params + t.numel(), nonzero + int((t != 0).sum())
        rows.append({"model": label, "run": str(run), "parameters": params, "nonzero": nonzero,
                     "bytes": (run / "model.safetensors").stat().st_size,
                     "latency_ms": round(_batch_latency_ms(model, x[:batch_size]), 4),
                     "accuracy": round(_accuracy(model, x, y), 4)})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per model, each figure also as a ratio of the first model's."""
    base = rows[0]
    lines = ["| model | parameters (non-zero) | bytes on disk | CPU ms per batch | accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} ({r['nonzero']:,}) | {r['bytes']:,} "
                     f"({base['bytes'] / r['bytes']:.2f}x smaller) | {r['latency_ms']:.3f} | "
                     f"{100 * r['accuracy']:.2f}% ({100 * (r['accuracy'] - base['accuracy']):+.2f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [("nonzero", "non-zero parameters"), ("bytes", "bytes on disk"), ("latency_ms", "ms per batch"),
                ("accuracy", "accuracy")]
    fig, axes = plt.subplots(1, len(measures), figsize=(3 * len(measures), 3))
    for ax, (key, title) in zip(axes, measures):
        ax.bar([r["model"] for r in rows], [r[key] / max(rows[0][key], 1e-12) for r in rows], color=["grey", "tab:blue"])
        ax.set_title(f"{title}\n(of the original)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
