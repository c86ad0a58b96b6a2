"""Renders the job spec reference (docs/spec.md) from the pydantic models, so the docs cannot drift."""
from __future__ import annotations

import typing

from pydantic import BaseModel

from raybig import spec as S

SECTIONS = [
    ("Top level", S.JobSpec, ""),
    ("model: kind mlp", S.MLPSpec, "model"), ("model: kind cnn", S.CNNSpec, "model"),
    ("model: kind lstm", S.LSTMSpec, "model"), ("model: kind transformer", S.TransformerSpec, "model"),
    ("model: kind python (your own module, docs/models.md)", S.PythonModelSpec, "model"),
    ("data: source digits", S.DigitsData, "data"), ("data: source text", S.TextData, "data"),
    ("data: source jsonl", S.JsonlData, "data"), ("data: source parquet", S.ParquetData, "data"),
    ("data: source csv", S.CsvData, "data"), ("data: source hf_disk", S.HFDiskData, "data"),
    ("data: source image_folder", S.ImageFolderData, "data"),
    ("data.augment (image_folder)", S.ImageAugment, "data.augment"),
    ("data.tokenizer (text, jsonl, a table's text field)", S.TokenizerSpec, "data.tokenizer"),
    ("data: source synthetic", S.SyntheticData, "data"),
    ("train", S.TrainSpec, "train"),
    *[(f"train.optimizer: name {m.model_fields['name'].annotation.__args__[0]}", m, "train.optimizer")
      for m in (S.SGD, S.Momentum, S.AdaGrad, S.RMSprop, S.Adam, S.AdamW)],
    ("train.regularization", S.Regularization, "train.regularization"),
    ("train.lr_schedule", S.LRSchedule, "train.lr_schedule"),
    ("parallelism", S.ParallelismSpec, "parallelism"), ("parallelism.pipeline", S.PipelineSpec, "parallelism.pipeline"),
    ("resources", S.ResourcesSpec, "resources"), ("checkpoint", S.CheckpointSpec, "checkpoint"),
    ("failure", S.FailureSpec, "failure"), ("output", S.OutputSpec, "output"),
    ("serve", S.ServeSpec, "serve"), ("serve.autoscaling", S.AutoscalingSpec, "serve.autoscaling"),
    ("sweep", S.SweepSpec, "sweep"), ("sweep.space.PATH (one axis)", S.Dimension, "sweep.space.PATH"),
    *[(f"sweep.scheduler: name {m.model_fields['name'].annotation.__args__[0]}", m, "sweep.scheduler")
      for m in (S.FifoScheduler, S.AshaScheduler, S.PbtScheduler)],
]


def _type(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in args if isinstance(a, type)) and len(args) > 2:
            return "section"
        return " or ".join(_type(a) for a in args) + (" or null" if len(args) < len(typing.get_args(annotation)) else "")
    if origin in (list, tuple):
        return f"{origin.__name__} of " + ", ".join(_type(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field) -> str:
    bits = []
    for meta in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >=")):
            value = getattr(meta, attr, None)
            if value is not None:
                bits.append(f"{sym} {value}")
    return ", ".join(bits)


def render() -> str:
    lines = ["# Job spec reference", "",
             "Generated from raybig/spec.py by `python -m raybig.specdoc > docs/spec.md`; "
             "`raybig schema` prints the same as JSON Schema. Unknown fields are errors everywhere, and every "
             "field can be set on the command line with `--set path=value`.", ""]
    for title, model, prefix in SECTIONS:
        lines += [f"## {title}", "", "| field | type | default | constraints | meaning |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "(section)" if isinstance(field.default_factory(), BaseModel) else f"`{field.default_factory()}`"
            else:
                default = f"`{field.default}`"
            path = f"{prefix}.{name}" if prefix else name
            doc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{path}` | {_type(field.annotation)} | {default} | {_constraints(field)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
