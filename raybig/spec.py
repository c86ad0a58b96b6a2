"""The job spec: one YAML file says what to train, on what data, how, and on how many workers.

Every model here is strict (unknown fields are errors) and every error is reported with the
dotted path of the field, the same path `--set path=value` takes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raybig.errors import SpecError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- models
class MLPSpec(Strict):
    kind: Literal["mlp"]
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[128, 128], min_length=1)
    num_classes: int | None = Field(default=None, gt=1, description="Defaults to the data's class count.")


class CNNSpec(Strict):
    kind: Literal["cnn"]
    channels: list[Annotated[int, Field(gt=0)]] = Field(default=[16, 32], min_length=1)
    kernel_size: int = Field(default=3, ge=1)
    hidden: int = Field(default=128, gt=0)
    num_classes: int | None = Field(default=None, gt=1)


class LSTMSpec(Strict):
    kind: Literal["lstm"]
    hidden: int = Field(default=64, gt=0)
    layers: int = Field(default=1, ge=1, description="Each LSTM layer is one block.")
    num_classes: int | None = Field(default=None, gt=1)


class TransformerSpec(Strict):
    kind: Literal["transformer"]
    task: Literal["classifier", "lm"] = Field(
        default="classifier", description="classifier: encoder over a sequence; lm: causal char-level language model.")
    dim: int = Field(default=64, gt=0)
    heads: int = Field(default=4, gt=0)
    layers: int = Field(default=2, ge=1, description="Each attention layer is one block.")
    ff_mult: int = Field(default=4, ge=1)
    num_classes: int | None = Field(default=None, gt=1)

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


class PythonModelSpec(Strict):
    kind: Literal["python"]
    factory: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_.]*$",
                         description="`package.module:function`, called as `function(meta, **args)` to build the "
                         "nn.Module (meta: the data's task, shape, num_classes, vocab); see docs/models.md.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the factory.")
    code: list[str] = Field(default_factory=list, description="Directories put first on the import path of every "
                            "process that builds the model, relative to the spec's file; default: the spec's "
                            "directory.")
    blocks: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                               description="The module's child nn.ModuleList of repeated blocks, for pipeline "
                               "stages; default: its only ModuleList child.")

    @model_validator(mode="after")
    def _absolute_code(self):
        self.code = [str(Path(c).expanduser().resolve()) for c in self.code]
        return self


class LoraSpec(Strict):
    r: int = Field(default=8, ge=1, description="Rank of each adapter's update.")
    alpha: float = Field(default=16.0, gt=0, description="The update is scaled by alpha / r.")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(default=None, min_length=1, description="Module names to adapt "
                                             "(e.g. [q_proj, v_proj]); default: peft's choice for the model type.")


class HFModelSpec(Strict):
    kind: Literal["hf"]
    task: Literal["causal_lm", "sequence_classification"] = Field(
        default="causal_lm", description="causal_lm: a decoder trained on data.source: text (AutoModelForCausalLM); "
        "sequence_classification: classes of token-id sequences, e.g. parquet columns of token ids "
        "(AutoModelForSequenceClassification; config.vocab_size is then required).")
    config: dict[str, Any] = Field(default_factory=dict, description="A transformers config: model_type (llama, "
                                   "mistral, qwen2, gpt2, ...) and its settings; vocab_size comes from the data.")
    pretrained: str | None = Field(default=None, description="A local save_pretrained directory to start from "
                                   "(relative to the spec's file) instead of config; never downloaded.")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters only (peft); the merged model "
                                  "is published and served.")

    @model_validator(mode="after")
    def _config_or_pretrained(self):
        if self.pretrained is None and "model_type" not in self.config:
            raise ValueError("set config.model_type (e.g. llama) or pretrained: a save_pretrained directory")
        if self.pretrained is not None and self.config:
            raise ValueError("config and pretrained are exclusive: a pretrained directory has its own config")
        if self.pretrained is not None:
            self.pretrained = str(Path(self.pretrained).expanduser().resolve())
        return self


ModelSpec = Annotated[Union[MLPSpec, CNNSpec, LSTMSpec, TransformerSpec, PythonModelSpec, HFModelSpec],
                      Field(discriminator="kind")]


# ----------------------------------------------------------------------------- data
class _DataCommon(Strict):
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    loader: Literal["auto", "memory", "stream"] = Field(
        default="auto",
        description="memory: each worker holds the split and takes its slice of every global batch; stream: "
        "the split is written once as shards in RAYBIG_CACHE (files read in pieces, and a corpus tokenized, in "
        "parallel by Ray Data tasks, never held whole; the built-in sources from memory) and each rank reads its slice of the same global batches a "
        "window at a time, resuming mid-epoch at the exact next batch; auto: stream when the data (a "
        "corpus: its files) is larger than memory_mb.")
    memory_mb: int = Field(default=256, ge=1, description="The data one process may hold: above it, auto "
                           "streams; a streaming rank holds about this much (its shuffle window and the next).")
    one_hot: bool = Field(default=False, description="One-hot targets (needed to train a classifier with mse).")

    @property
    def is_text(self) -> bool:
        """Token windows for a language model, rather than samples with class labels."""
        return False

    @property
    def is_regression(self) -> bool:
        return False


class TokenizerSpec(Strict):
    """How text becomes token ids: a Hugging Face tokenizer from a directory, or a BPE trained on the data."""
    path: str | None = Field(default=None, description="A directory holding tokenizer.json (or the file itself).")
    train: Literal["bpe"] | None = Field(default=None, description="bpe: a byte-level BPE trained on the training "
                                         "split, once (cached in RAYBIG_CACHE by the text and settings).")
    vocab_size: int = Field(default=2048, ge=300, description="train: the vocabulary size, special tokens included.")
    eos_token: str | None = Field(default=None, description="The end-of-text token put after each document; default "
                                  "the tokenizer's own (<|endoftext|>, </s>, ...).")

    @model_validator(mode="after")
    def _one_way(self):
        if (self.path is None) == (self.train is None):
            raise ValueError("give either path (a directory with tokenizer.json) or train: bpe")
        return self


class _TextCommon(_DataCommon):
    seq_len: int = Field(default=64, ge=2, description="Tokens per training window.")
    tokenizer: TokenizerSpec | None = Field(
        default=None, description="Default: a pretrained model directory's tokenizer.json where it has one, "
        "else the text's characters are its tokens.")
    on_error: Literal["fail", "skip"] = Field(default="fail", description="A row that cannot be read (bad JSON, a "
                                              "missing field, undecodable text): fail names it; skip counts it.")

    @property
    def is_text(self) -> bool:
        return True


class _BuiltinData(_DataCommon):
    train_fraction: float = Field(default=1.0, gt=0, le=1, description="Train on this fraction of the training "
                                  "rows (drawn per class with a fixed seed, the same in every run); validation "
                                  "keeps all of its rows. A small labelled set, e.g. to distil onto.")


class DigitsData(_BuiltinData):
    source: Literal["digits"]
    classes: list[Annotated[int, Field(ge=0, le=9)]] | None = Field(
        default=None, min_length=2, description="Keep only these digits, as classes 0..k-1 in the order given "
        "(e.g. [5, 6, 7, 8, 9]); default all ten.")

    @model_validator(mode="after")
    def _distinct_classes(self):
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct digits, got {self.classes}")
        return self


class TextData(_TextCommon):
    source: Literal["text"]
    path: str | None = Field(default=None, description="A text file, a directory of them or a glob (local, or "
                             "s3:// / gs://: mirrored into RAYBIG_CACHE); without it, Python's standard-library "
                             "files named by modules.")
    document: Literal["file", "line"] = Field(default="file", description="What one document is: a file, or "
                                              "each non-empty line.")
    max_chars: int = Field(default=300_000, ge=1000, description="The standard-library corpus's length.")
    modules: list[str] = Field(
        default=["argparse", "logging/__init__", "collections/__init__", "textwrap", "difflib", "inspect"],
        description="Python standard-library files (without .py) whose text forms the corpus.")


class JsonlData(_TextCommon):
    source: Literal["jsonl"]
    path: str = Field(description="A .jsonl file (one JSON object per line), a directory of them or a glob; "
                      "local, or s3:// / gs:// (mirrored into RAYBIG_CACHE).")
    format: Literal["text", "prompt_completion", "chat"] = Field(
        default="text", description="text: the field is a document; prompt_completion: the loss is on the "
        "completion only; chat: messages rendered through the tokenizer's chat template, the loss on the "
        "assistant's turns.")
    field: str = Field(default="text", description="text: the field holding the document.")
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = Field(default="messages", description="chat: a list of {role, content}.")


class _TableData(_DataCommon):
    path: str = Field(description="A file, a directory of them or a glob; local, or s3:// / gs:// (mirrored into "
                      "RAYBIG_CACHE).")
    val_path: str | None = None
    label: str = Field(default="label", description="The target column: class indices or names, or (task regression) "
                       "numbers.")
    task: Literal["classification", "regression"] = Field(
        default="classification", description="regression: predict the label column's number (mse; MSE and MAE "
        "reported).")
    features: list[str] | None = Field(default=None, description="Feature columns; default every column but the label.")
    shape: list[Annotated[int, Field(gt=0)]] | None = Field(default=None, description="Per-sample shape, e.g. [8, 8].")
    field: str | None = Field(default=None, description="A text column: its rows are documents for a language "
                              "model (label and features are then not read).")
    seq_len: int = Field(default=64, ge=2, description="field: tokens per training window.")
    tokenizer: TokenizerSpec | None = Field(default=None, description="field: as data.tokenizer of source text.")
    on_error: Literal["fail", "skip"] = Field(default="fail", description="A row with an empty or unreadable "
                                              "value: fail names it; skip counts it.")

    @property
    def is_text(self) -> bool:
        return self.field is not None

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"


class ParquetData(_TableData):
    source: Literal["parquet"]


class CsvData(_TableData):
    source: Literal["csv"]
    delimiter: str = Field(default=",", min_length=1, max_length=1)


class HFDiskData(_TableData):
    source: Literal["hf_disk"]
    path: str = Field(description="A directory written by datasets' save_to_disk (a Dataset, or a DatasetDict "
                      "whose validation or test split becomes the validation data); with builder, local files.")
    builder: Literal["json", "csv", "parquet", "text"] | None = Field(
        default=None, description="Read path (a file, a directory or a glob) and val_path through "
        "datasets.load_dataset(builder, data_files=...) instead of load_from_disk.")


class ImageAugment(Strict):
    flip: bool = Field(default=False, description="Mirror each training image left-right with probability 1/2.")
    crop_padding: int = Field(default=0, ge=0, description="Pad by this many pixels and crop back at a random offset.")


class ImageFolderData(_DataCommon):
    source: Literal["image_folder"]
    path: str = Field(description="A directory with one subdirectory of images per class (the class names, sorted).")
    val_path: str | None = Field(default=None, description="The same layout for validation; default a split of path.")
    size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="[height, width] to resize to; default the images' own (which must agree).")
    channels: Literal[1, 3] | None = Field(default=None, description="1 (grey) or 3 (RGB); default the first image's.")
    augment: ImageAugment = Field(default_factory=ImageAugment, description="Training images only.")
    on_error: Literal["fail", "skip"] = Field(default="fail", description="An image that cannot be decoded.")


class SyntheticData(_BuiltinData):
    source: Literal["synthetic"]
    samples: int = Field(default=2048, ge=16)
    features: int = Field(default=16, ge=1)
    classes: int = Field(default=4, ge=2)
    noise: float = Field(default=1.0, ge=0)
    seed: int = 0


DataSpec = Annotated[Union[DigitsData, TextData, JsonlData, ParquetData, CsvData, HFDiskData, ImageFolderData,
                           SyntheticData], Field(discriminator="source")]


# ----------------------------------------------------------------------------- training
class _Opt(Strict):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class SGD(_Opt):
    name: Literal["sgd"]
    lr: float = Field(default=0.05, gt=0)


class Momentum(_Opt):
    name: Literal["momentum"]
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False


class AdaGrad(_Opt):
    name: Literal["adagrad"]
    lr: float = Field(default=0.01, gt=0)
    lr_decay: float = Field(default=0.0, ge=0)
    eps: float = Field(default=1e-10, gt=0)


class RMSprop(_Opt):
    name: Literal["rmsprop"]
    alpha: float = Field(default=0.99, gt=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)


class Adam(_Opt):
    name: Literal["adam"]
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)


class AdamW(Adam):
    name: Literal["adamw"]
    weight_decay: float = Field(default=0.01, ge=0)


OptimizerSpec = Annotated[Union[SGD, Momentum, AdaGrad, RMSprop, Adam, AdamW], Field(discriminator="name")]
OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw")


class Regularization(Strict):
    l1: float = Field(default=0.0, ge=0, description="Coefficient of the summed |w| of weight matrices, added to the loss.")
    l2: float = Field(default=0.0, ge=0, description="Coefficient of the summed w^2 of weight matrices, added to the loss.")
    dropout: float = Field(default=0.0, ge=0, lt=1)


class LRSchedule(Strict):
    name: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    step_epochs: int = Field(default=10, ge=1, description="step: multiply the lr by gamma every this many epochs.")
    gamma: float = Field(default=0.1, gt=0, le=1)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="cosine: the final lr as a fraction of the first.")


class TrainSpec(Strict):
    epochs: int = Field(default=10, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="Train this many optimizer steps, over as many "
                                  "passes of the data as that takes; takes precedence over epochs. Raising it "
                                  "continues a finished run.")
    batch_size: int = Field(default=64, ge=1, description="Global batch: split evenly over the data-parallel ranks.")
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    optimizer: OptimizerSpec = Field(default_factory=lambda: AdamW(name="adamw"))
    regularization: Regularization = Field(default_factory=Regularization)
    lr_schedule: LRSchedule = Field(default_factory=LRSchedule)
    grad_clip: float | None = Field(default=None, gt=0)
    divergence_factor: float | None = Field(
        default=100.0, gt=1, description="Stop the run as diverged when an epoch's mean training loss exceeds this "
        "multiple of the run's first step loss (NaN or infinite losses always stop it); null turns the check off.")
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="bf16 and fp16 run the forward under autocast (weights and optimizer state "
        "stay fp32; under fsdp, FSDP2's mixed-precision policy gathers parameters in that dtype and reduces "
        "gradients in fp32); fp16 also scales the loss dynamically, skipping a step whose gradients overflow.")
    grad_accumulation: int = Field(
        default=1, ge=1, description="Split each rank's batch into this many microbatches, run one after another, "
        "with gradients synchronised across ranks once, after the last: the same optimizer step, with the "
        "activation memory of a batch this many times smaller. With pipeline stages use "
        "parallelism.pipeline.microbatches, which does the same.")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none", description="Per repeated block: full keeps only each block's input and recomputes the "
        "rest in backward; selective keeps the outputs of matrix multiplies and attention and recomputes the "
        "cheap element-wise work; none keeps everything (fastest, most memory).")
    compile: Literal["off", "model", "blocks"] = Field(
        default="off", description="torch.compile, applied from outside the model: model compiles what each rank "
        "runs whole (the model, or its pipeline stages); blocks compiles each repeated block on its own, as "
        "torchtitan does (faster to compile, and the unit FSDP and pipeline stages are made of).")


# ----------------------------------------------------------------------------- layout and operations
class PipelineSpec(Strict):
    stages: int = Field(default=1, ge=1, description="Pipeline degree: ranks each model replica is split over.")
    microbatches: int = Field(default=1, ge=1, description="Microbatches per data-parallel rank's batch.")
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    virtual_stages: int = Field(default=1, ge=1, description="interleaved_1f1b: stages per rank (>= 2).")
    split_points: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="Block indices where stages 2, 3, ... begin; default: balanced by parameter count.")

    @property
    def total_stages(self) -> int:
        return self.stages * (self.virtual_stages if self.schedule == "interleaved_1f1b" else 1)


class ParallelismSpec(Strict):
    data: int = Field(default=1, ge=1, description="Data-parallel degree: one worker (a Ray actor) per rank.")
    data_mode: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="ddp: every rank holds the whole model (DistributedDataParallel); fsdp: "
        "parameters, gradients and optimizer state are sharded over the data ranks (FSDP2 fully_shard, per "
        "block), for models that do not fit one device.")
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    tensor: int = Field(
        default=1, ge=1, description="Tensor-parallel degree: each block's attention (by heads) and MLP (column- "
        "then row-wise) split over this many ranks (torch.distributed.tensor.parallel), for the transformer, "
        "Llama-style hf models (from the config's own plan) and python models defining raybig_tp_plan().")

    @property
    def workers(self) -> int:
        return self.data * self.pipeline.stages * self.tensor

    @property
    def degrees(self) -> str:
        """The layout in words: data 2 (fsdp) x pipeline 2 x tensor 2."""
        out = f"data {self.data}" + (" (fsdp)" if self.data_mode == "fsdp" else "")
        out += f" x pipeline {self.pipeline.stages}" if self.pipeline.stages > 1 else ""
        return out + (f" x tensor {self.tensor}" if self.tensor > 1 else "")


class ResourcesSpec(Strict):
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)


class EvalSpec(Strict):
    every_steps: int | None = Field(default=None, ge=1, description="Evaluate, and record the metrics, every this "
                                    "many steps; default at the end of each epoch. The last step is always recorded.")
    max_batches: int | None = Field(default=None, ge=1, description="Validation batches per rank at most: a fixed "
                                    "sample of the validation split, for frequent evaluation of a large one.")


class CheckpointSpec(Strict):
    every_epochs: int = Field(default=1, ge=1)
    every_steps: int | None = Field(default=None, ge=1, description="Checkpoint every this many steps instead of "
                                    "at epoch ends; a run stopped between two resumes at the very next batch.")
    keep: int = Field(default=2, ge=1, description="How many epoch checkpoints to keep (the newest).")


class FailureSpec(Strict):
    max_failures: int = Field(default=0, ge=0, description="Worker failures to recover from (resuming from the last checkpoint).")


class OutputSpec(Strict):
    dir: str = Field(default="runs", description="The model store: each run lives in <dir>/<name>/.")


class AutoscalingSpec(Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


class ServeSpec(Strict):
    """How `raybig serve` exposes the trained model; read from the run's stored spec, flags override."""
    version: str = Field(default="v1", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
    replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSpec | None = None
    max_batch_size: int = Field(default=32, ge=1, description="Requests merged into one forward pass at most.")
    batch_wait_ms: float = Field(default=5.0, ge=0, description="How long a replica waits to fill a batch.")
    cpus_per_replica: float = Field(default=1.0, gt=0)
    gpus_per_replica: float = Field(default=0.0, ge=0)
    max_payload_bytes: int = Field(default=1_000_000, ge=1024, description="Larger request bodies get 413.")
    max_samples_per_request: int = Field(default=1024, ge=1)
    request_timeout_s: float = Field(
        default=30.0, gt=0, le=86_400, description="A request through Serve's HTTP proxy not answered within "
        "this many seconds gets 408; a generation streaming past it is cut off there.")
    auth_token_env: str | None = Field(
        default=None, description="Name of an environment variable holding a bearer token; requests without it get 401.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)


# ----------------------------------------------------------------------------- sweeps
class Dimension(Strict):
    """One axis of a search space: exactly one of these keys."""
    choice: list[Any] | None = Field(default=None, min_length=1, description="Sample one of these values.")
    grid: list[Any] | None = Field(default=None, min_length=1, description="Try every one of these values.")
    uniform: tuple[float, float] | None = Field(default=None, description="[low, high]")
    loguniform: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="[low, high], both > 0, sampled evenly in log space.")
    randint: tuple[int, int] | None = Field(default=None, description="[low, high): an integer, high excluded.")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in DIMENSION_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DIMENSION_KINDS)}"
                             + (f" (got {', '.join(given)})" if given else ""))
        if given[0] in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, given[0])
            if not low < high:
                raise ValueError(f"{given[0]}: low {low} must be below high {high}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIMENSION_KINDS if getattr(self, k) is not None)

    @property
    def args(self):
        return getattr(self, self.kind)

    def probes(self) -> list[Any]:
        """Values that stand for the whole axis when checking it against the spec: every listed value,
        or a range's ends (randint's high is excluded)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]


DIMENSION_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class FifoScheduler(Strict):
    name: Literal["fifo"]


class AshaScheduler(Strict):
    name: Literal["asha"]
    grace_period: int = Field(default=1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(default=2.0, gt=1, description="1 / the fraction of trials kept at each rung.")


class PbtScheduler(Strict):
    name: Literal["pbt"]
    perturbation_interval: int = Field(default=2, ge=1, description="Epochs between exploit/explore steps.")
    quantile_fraction: float = Field(default=0.25, ge=0, le=0.5,
                                     description="The bottom fraction copies the top fraction's checkpoint.")
    resample_probability: float = Field(default=0.25, ge=0, le=1,
                                        description="Chance to resample a value instead of perturbing it.")
    synch: bool = Field(default=True, description="Exploit when every trial has reached the interval (the "
                        "same decisions on a busy machine as on an idle one); false: as each trial arrives.")


SchedulerSpec = Annotated[Union[FifoScheduler, AshaScheduler, PbtScheduler], Field(discriminator="name")]
METRIC_MODES = {"val_accuracy": "max", "val_f1": "max", "val_precision": "max", "val_recall": "max",
                "val_loss": "min", "train_loss": "min", "val_perplexity": "min", "val_token_accuracy": "max",
                "val_mse": "min", "val_mae": "min"}
CLASSIFIER_METRICS = ("val_accuracy", "val_f1", "val_precision", "val_recall")


class SweepSpec(Strict):
    """What `raybig sweep` searches: each trial is a full run of this spec with the sampled values set."""
    metric: Literal["val_accuracy", "val_f1", "val_precision", "val_recall", "val_loss", "train_loss",
                    "val_perplexity", "val_token_accuracy", "val_mse", "val_mae"] = Field(
        default="val_accuracy", description="val_perplexity and val_token_accuracy: language models (whose default "
        "is val_loss); val_mse, val_mae: regression (default val_loss); val_accuracy, val_f1, val_precision, "
        "val_recall: classifiers.")
    mode: Literal["max", "min"] | None = Field(default=None, description="Default: max for accuracy, F1, precision "
                                               "and recall; min for losses and perplexity.")
    space: dict[str, Dimension] = Field(min_length=1, description="Dotted spec paths (as --set takes them), e.g. "
                                        "train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}.")
    searcher: Literal["random", "grid", "optuna"] = Field(
        default="random", description="random; grid (every combination of choice/grid values once); optuna "
        "(Bayesian, tree-structured Parzen estimator).")
    scheduler: SchedulerSpec = Field(default_factory=lambda: FifoScheduler(name="fifo"),
                                     description="fifo, asha or pbt; a name alone takes the defaults.")
    trials: int | None = Field(default=None, ge=1, description="Trials to sample (random, optuna; default 8). "
                               "grid runs each combination once.")
    max_concurrent: int = Field(default=2, ge=1, description="Trials running at once.")
    time_budget_s: float | None = Field(default=None, gt=0, description="Stop starting and running trials after this.")
    seed: int = Field(default=0, description="Seeds the searcher, so the same spec samples the same configs.")

    @model_validator(mode="before")
    @classmethod
    def _scheduler_by_name(cls, data):
        if isinstance(data, dict) and isinstance(data.get("scheduler"), str):
            data = {**data, "scheduler": {"name": data["scheduler"]}}
        return data

    @property
    def goal(self) -> str:
        return self.mode or METRIC_MODES[self.metric]

    @property
    def num_trials(self) -> int:
        return self.trials or 8


class InitFromSpec(Strict):
    """Fine-tuning: a fresh run that starts from trained weights instead of random ones."""
    source: str = Field(min_length=1, description="The weights to start from: a run's name in output.dir, a run "
                        "directory (its model.safetensors), a .safetensors file, or a registered version "
                        "(models:/NAME@ALIAS, models:/NAME/VERSION).")
    freeze: list[str] = Field(default_factory=list, description="Parameter names, or prefixes of them (blocks.0), "
                              "that keep their loaded values.")
    train_last: int | None = Field(default=None, ge=1, description="Freeze every part of the model but the last "
                                   "N (a classifier's head is its last part); `raybig validate` lists the parts.")
    pretrained_lr_scale: float = Field(default=1.0, gt=0, le=1, description="Loaded weights train at this fraction "
                                       "of train.optimizer.lr; re-initialised ones (a head whose shape changed) at "
                                       "the full rate.")
    keep_zeros: bool = Field(default=False, description="Loaded weights that are exactly zero stay zero (the "
                             "fine-tune of a pruned model).")


class DistillSpec(Strict):
    """Knowledge distillation: the student (this spec's model) learns from a trained teacher's outputs."""
    teacher: str = Field(min_length=1, description="A trained run: its name in output.dir or its directory, or a "
                         "registered version (models:/NAME@ALIAS, models:/NAME/VERSION).")
    temperature: float = Field(default=2.0, gt=0, description="Softens both models' outputs before they are "
                               "compared; the soft loss is scaled by its square.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the soft loss (the student's KL "
                         "divergence from the teacher); 1 - alpha weighs the usual loss on the labels.")
    trust_code: bool = Field(default=False, description="A teacher that is a python model runs its factory's code: "
                             "only with this set.")


class TrackingSpec(Strict):
    """MLflow tracking of the run (docs/lifecycle.md)."""
    enabled: bool = Field(default=True, description="Record the run in MLflow when it ends: the resolved spec as "
                          "parameters, every record's metrics, the model, spec and curves as artifacts. "
                          "RAYBIG_TRACKING=off turns it off everywhere.")
    uri: str | None = Field(default=None, description="A tracking server (http://host:5000) or store URI; default "
                            "$MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/mlflow.db beside the runs.")
    experiment: str = Field(default="raybig", min_length=1, description="The MLflow experiment the runs go to.")


def run_reference(ref: str, output_dir: str) -> str:
    """A run name (no slash) lives in output.dir; anything else is a path. Absolute, so every process, in any
    directory, reads the same files."""
    if "://" in ref or ref.startswith("models:/"):  # a registered version: fetched on the driver (check_plan)
        return ref
    path = Path(ref).expanduser() if ("/" in ref or ref.endswith(".safetensors")) else Path(output_dir) / ref
    return str(path.resolve())


class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Run name; also its directory in the model store.")
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    sweep: SweepSpec | None = Field(default=None, description="Used by `raybig sweep`; `raybig run` ignores it.")
    init_from: InitFromSpec | None = Field(default=None, description="Fine-tune: start from trained weights "
                                           "(docs/lifecycle.md).")
    distill: DistillSpec | None = Field(default=None, description="Train the model as a student of a trained "
                                        "teacher (docs/lifecycle.md).")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _cross_field(self):
        problems = []
        if "://" in self.output.dir:  # run names in an object store are not paths here
            if self.init_from is not None and "/" not in self.init_from.source:
                problems.append(("init_from.source", "a run in an object-store output.dir cannot be named; give "
                                 "a local run directory or .safetensors file"))
            if self.distill is not None and "/" not in self.distill.teacher:
                problems.append(("distill.teacher", "a run in an object-store output.dir cannot be named; give a "
                                 "local run directory"))
        else:
            if self.init_from is not None:
                self.init_from.source = run_reference(self.init_from.source, self.output.dir)
            if self.distill is not None:
                self.distill.teacher = run_reference(self.distill.teacher, self.output.dir)
        if self.init_from is not None and self.model.kind == "hf" and self.model.lora:
            problems.append(("init_from", "LoRA trains adapters on model.pretrained; init_from does not combine "
                             "with model.lora"))
        if self.init_from is not None and self.init_from.keep_zeros and self.parallelism.data_mode == "fsdp":
            problems.append(("init_from.keep_zeros", "keeps zeros of whole weights: use parallelism.data_mode ddp"))
        if self.distill is not None and self.train.loss == "mse":
            problems.append(("distill", "distillation trains with cross_entropy on the labels beside the "
                             "teacher's soft targets; train.loss is mse"))
        if self.distill is not None and self.data.is_regression:
            problems.append(("distill", "distillation matches a classifier's or a language model's output "
                             "distribution; this data is a regression"))
        if self.train.batch_size % self.parallelism.data:
            problems.append(("train.batch_size", f"global batch {self.train.batch_size} is not divisible by "
                             f"parallelism.data {self.parallelism.data}"))
        is_lm = (self.model.kind == "transformer" and self.model.task == "lm") or \
            (self.model.kind == "hf" and self.model.task == "causal_lm")
        if self.model.kind == "hf" and self.model.lora and self.parallelism.data_mode == "fsdp":
            problems.append(("parallelism.data_mode", "LoRA trains under ddp (the merged model is made from whole "
                             "weights on one rank)"))
        if self.model.kind == "hf" and self.model.lora and self.parallelism.pipeline.stages > 1:
            problems.append(("parallelism.pipeline.stages", "LoRA fine-tuning trains data-parallel (the merged "
                             "model is made on one rank); use parallelism.data"))
        if self.model.kind == "hf" and self.train.regularization.dropout:
            problems.append(("train.regularization.dropout", "a Hugging Face model takes its dropout from its "
                             "config (e.g. model.config.attention_dropout)"))
        if self.model.kind == "python":
            is_lm = self.data.is_text  # the user's module takes whichever the data is
            if self.train.regularization.dropout:
                problems.append(("train.regularization.dropout", "a python model has the dropout its factory gives "
                                 "it; set it through model.args"))
        if self.sweep is not None and self.sweep.metric in ("val_perplexity", "val_token_accuracy") and not is_lm:
            problems.append(("sweep.metric", f"{self.sweep.metric} is a language model's metric; this model is a "
                             "classifier"))
        if self.sweep is not None and (self.train.max_steps or self.eval.every_steps or self.checkpoint.every_steps):
            problems.append(("sweep", "sweep trials count epochs (their schedulers act at epoch ends): leave "
                             "train.max_steps, eval.every_steps and checkpoint.every_steps out of a sweep"))
        regression = self.data.is_regression
        if self.sweep is not None and (is_lm or regression) and "metric" not in self.sweep.model_fields_set:
            self.sweep.metric = "val_loss"  # the default, val_accuracy, is a classifier's
        if self.sweep is not None and self.sweep.metric in CLASSIFIER_METRICS and (is_lm or regression):
            problems.append(("sweep.metric", f"{self.sweep.metric} is a classifier's metric; a "
                             + ("language model reports val_loss, val_perplexity and val_token_accuracy" if is_lm
                                else "regression reports val_loss, val_mse and val_mae")))
        if self.sweep is not None and self.sweep.metric in ("val_mse", "val_mae") and not regression:
            problems.append(("sweep.metric", f"{self.sweep.metric} is a regression's metric"))
        if regression and "loss" not in self.train.model_fields_set:
            self.train.loss = "mse"  # a regression's loss, unless the spec says otherwise (and is refused below)
        if regression and self.train.loss != "mse":
            problems.append(("train.loss", "a regression trains with mse"))
        if self.train.loss == "mse" and not self.data.one_hot and not regression:
            problems.append(("train.loss", "mse on a classifier needs one-hot targets: set data.one_hot: true, "
                             "or use cross_entropy"))
        if is_lm != self.data.is_text:
            problems.append(("data.source" if is_lm else "model.task",
                             "a language model (transformer with task: lm, or hf with task: causal_lm) trains on "
                             "text (data.source text or jsonl, or a table's text column by data.field), and text "
                             "needs such a model"))
        if is_lm and self.train.loss == "mse":
            problems.append(("train.loss", "the language model trains with cross_entropy"))
        problems += _pipeline_problems(self)
        problems += _memory_lever_problems(self)
        problems += _tensor_problems(self)
        problems += _gpu_problems(self)
        if self.sweep is not None and not problems:
            from raybig.sweep.space import space_problems  # probes the space by parsing specs: needs this class

            problems += space_problems(self)
        if problems:
            raise SpecError(problems)
        return self

    def to_yaml(self) -> str:
        skip = {"sweep"} if self.sweep is None else None  # a run's stored spec stays free of an empty section
        return yaml.safe_dump(self.model_dump(mode="json", exclude=skip), sort_keys=False)


def _memory_lever_problems(spec: "JobSpec") -> list[tuple[str, str]]:
    t, p = spec.train, spec.parallelism
    if t.grad_accumulation == 1:
        return []
    if p.pipeline.stages > 1:
        return [("train.grad_accumulation", "a pipeline schedule already accumulates over its microbatches: use "
                 "parallelism.pipeline.microbatches")]
    if t.batch_size % (p.data * t.grad_accumulation):
        return [("train.batch_size", f"global batch {t.batch_size} is not divisible by parallelism.data x "
                 f"train.grad_accumulation = {p.data * t.grad_accumulation}")]
    return []


def _tensor_problems(spec: "JobSpec") -> list[tuple[str, str]]:
    """What the spec alone tells about tensor parallelism; the model's own plan is checked by check_plan."""
    tp, m = spec.parallelism.tensor, spec.model
    if tp == 1:
        return []
    if m.kind in ("mlp", "cnn", "lstm"):
        return [("parallelism.tensor", f"the {m.kind} model has no tensor-parallel plan: tensor parallelism splits "
                 "attention heads and MLPs (model.kind transformer or hf, or a python model with raybig_tp_plan())")]
    out = []
    if m.kind == "transformer" and m.heads % tp:
        out.append(("parallelism.tensor", f"{tp} does not divide model.heads {m.heads}: each rank takes whole heads"))
    if m.kind == "hf" and m.lora:
        out.append(("parallelism.tensor", "LoRA trains data-parallel (the merged model is made from whole weights)"))
    if spec.init_from is not None and spec.init_from.keep_zeros:
        out.append(("init_from.keep_zeros", "keeps zeros of whole weights: leave parallelism.tensor at 1"))
    return out


def _gpu_problems(spec: "JobSpec") -> list[tuple[str, str]]:
    """NCCL runs one rank per GPU: two ranks given the same device fail inside it ("Duplicate GPU detected")."""
    gpus, workers = spec.resources.gpus_per_worker, spec.parallelism.workers
    if gpus == 0 or float(gpus).is_integer() or (gpus < 1 and workers == 1):
        return []
    if gpus < 1:
        return [("resources.gpus_per_worker", f"{gpus:g} lets Ray put two of the run's {workers} ranks on one GPU, "
                 "which NCCL refuses (one rank per device): give each rank a whole GPU (1)")]
    return [("resources.gpus_per_worker", f"{gpus:g}: a rank uses one device; give a whole number of GPUs")]


def _pipeline_problems(spec: "JobSpec") -> list[tuple[str, str]]:
    pipe, data = spec.parallelism.pipeline, spec.parallelism.data
    if pipe.stages == 1:
        return []
    out = []
    where = "parallelism.pipeline"
    if spec.train.batch_size % (pipe.microbatches * data):
        out.append(("train.batch_size", f"global batch {spec.train.batch_size} is not divisible by "
                    f"{where}.microbatches x parallelism.data = {pipe.microbatches * data}"))
    if pipe.schedule == "interleaved_1f1b":
        if pipe.virtual_stages < 2:
            out.append((f"{where}.virtual_stages", "interleaved_1f1b needs at least 2 virtual stages per rank"))
        rounds = max(1, pipe.microbatches // pipe.stages)
        if pipe.microbatches % rounds:
            out.append((f"{where}.microbatches", f"interleaved_1f1b needs microbatches to be a multiple of "
                        f"{rounds} (microbatches // stages); use a multiple of {pipe.stages}"))
    elif pipe.virtual_stages != 1:
        out.append((f"{where}.virtual_stages", f"only interleaved_1f1b uses virtual stages; {pipe.schedule} takes 1"))
    if pipe.schedule != "gpipe" and pipe.microbatches < pipe.total_stages:
        out.append((f"{where}.microbatches", f"{pipe.schedule} needs at least as many microbatches as stages "
                    f"({pipe.total_stages}); got {pipe.microbatches}"))
    if pipe.split_points is not None:
        points = pipe.split_points
        if len(points) != pipe.total_stages - 1 or points != sorted(set(points)):
            out.append((f"{where}.split_points", f"expected {pipe.total_stages - 1} increasing block indices "
                        f"(where stages 2..{pipe.total_stages} begin), got {points}"))
    return out


# ----------------------------------------------------------------------------- loading
_TAGS = {"model": "kind", "data": "source", "optimizer": "name", "scheduler": "name"}


def _union_members(annotated) -> tuple:
    return annotated.__origin__.__args__


def _tag_values(field: str) -> list[str]:
    union = {"model": ModelSpec, "data": DataSpec, "optimizer": OptimizerSpec, "scheduler": SchedulerSpec}[field]
    return [m.model_fields[_TAGS[field]].annotation.__args__[0] for m in _union_members(union)]


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = _strip_tags(loc)
        kind, msg = e["type"], e["msg"]
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "union_tag_invalid":
            field = loc[-1] if loc else ""
            tag = _TAGS.get(field, "kind")
            path = f"{path}.{tag}" if path else tag
            msg = f"{e['input'].get(tag)!r} is not one of: {', '.join(_tag_values(field))}" if field in _TAGS else msg
        elif kind == "union_tag_not_found":
            field = loc[-1] if loc else ""
            tag = _TAGS.get(field, "kind")
            path = f"{path}.{tag}" if path else tag
            msg = f"missing; expected one of: {', '.join(_tag_values(field))}" if field in _TAGS else msg
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "value_error" and isinstance(e.get("ctx", {}).get("error"), SpecError):
            out.extend(e["ctx"]["error"].problems)
            continue
        else:
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg = f"{msg} (got {e['input']!r})"
        out.append((path, msg))
    return out


def _strip_tags(loc: tuple) -> str:
    parts: list[str] = []
    skip_next_tag_of = None
    for part in loc:
        if skip_next_tag_of is not None:
            field, skip_next_tag_of = skip_next_tag_of, None
            if isinstance(part, str) and part in _tag_values(field):
                continue
        parts.append(str(part))
        if part in _TAGS:
            skip_next_tag_of = part
    return ".".join(parts)


def parse_spec(raw: Any, source: str = "spec") -> JobSpec:
    if raw is None:
        raise SpecError(f"{source} is empty; expected a mapping with name, model, data and train")
    if not isinstance(raw, dict):
        raise SpecError(f"{source} must be a YAML mapping of fields (name, model, data, ...), not a {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None
    except SpecError:
        raise


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}: invalid YAML{line}: {reason}") from None


def apply_overrides(raw: Any, overrides: list[str]) -> Any:
    """Apply `path=value` pairs; values parse as YAML so `--set train.epochs=3` gives an int."""
    if not overrides:
        return raw
    raw = dict(raw or {})
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected path=value, e.g. train.epochs=3")
        path, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SpecError(f"--set {path}: value {text!r} is not valid YAML") from None
        raw = set_path(raw, path.strip(), value)
    return raw


def set_path(raw: dict, path: str, value: Any) -> dict:
    """A copy of `raw` with the field at dotted `path` set to `value` (sections on the way are created)."""
    raw = dict(raw or {})
    keys = path.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise SpecError(f"{'.'.join(keys[:i + 1])} is a value, not a section", path)
        node[key] = child = dict(child)
        node = child
    node[keys[-1]] = value
    return raw


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    return parse_spec(_code_beside(apply_overrides(read_yaml(path), overrides or []), Path(path)), source=str(path))


def _code_beside(raw: Any, path: Path) -> Any:
    """A python model's code directories and an hf model's pretrained directory are relative to its spec's
    file (code by default: that file's directory)."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and model.get("kind") == "hf" and isinstance(model.get("pretrained"), str):
        return {**raw, "model": {**model, "pretrained": str(path.resolve().parent / model["pretrained"])}}
    if not isinstance(model, dict) or model.get("kind") != "python":
        return raw
    code = model.get("code", ["."])
    if isinstance(code, list):
        code = [str(path.resolve().parent / c) if isinstance(c, str) else c for c in code]
    return {**raw, "model": {**model, "code": code}}


def json_schema() -> str:
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "raybig job spec"
    return json.dumps(schema, indent=2)
