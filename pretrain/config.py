"""The training config: one nested dataclass tree, recipes as files, strict dotted overrides.

    cfg = load_config("recipes/tiny_cpu.yaml", ["optim.lr=1e-3", "jepa.weight=2"])

Every field has a default and a one-line docstring with its unit. A recipe file (YAML or JSON) is a
nested mapping merged onto the defaults; overrides are `dotted.key=value` strings merged after it.
Both are strict: an unknown key or a value of the wrong type is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Shard folders written by data_pipeline.preprocess (each holds a manifest.json)."""
    weights: list[float] | None = None
    """Share of each folder in `paths`; None = proportional to size."""
    blend_by: Literal["tokens", "records"] = "tokens"
    """What data.weights are shares of: tokens (as Megatron and OLMo-core blend; sources of long
    documents get no more than their weight) or records."""
    seq_len_tokens: int = 1024
    """Length of a packed row in tokens."""
    micro_batch_rows: int = 8
    """Rows per micro-batch per rank."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_rows: int = 0
    """Rows per optimizer step over all ranks; 0 = derived. If set, must equal
    micro_batch_rows × grad_accum_steps × world size."""
    pairs: Literal["first", "chain", "all_from_first"] = "first"
    """JEPA pairs of a multi-view record: 0→1; i→i+1 (paraphrase chains); 0→every other view."""
    overlong: Literal["truncate", "skip"] = "truncate"
    """A record whose LM document exceeds a row: truncate it or skip it."""
    packing_window: int = 16
    """Best-fit packing: records are placed, the longest first, into the row they fill best,
    over windows of this many rows' worth of tokens (the emptiest row's records wait for the
    next window); 0 = in order, a record that does not fit closing its row."""
    records_per_row: int = 0
    """At most this many records per row; 0 = fill the row. A fixed count gives every JEPA
    setting the same LM data per step (paired experiments), given seq_len_tokens fits them."""
    verify_checksums: bool = False
    """Hash every shard file against its manifest at start (slow on large corpora)."""
    prefetch_steps: int = 1
    """Steps of micro-batches packed ahead by a background thread; 0 = pack on the main thread."""

    def __post_init__(self):
        _check(self.seq_len_tokens >= 8, "data.seq_len_tokens", ">= 8", self.seq_len_tokens)
        _check(self.micro_batch_rows >= 1, "data.micro_batch_rows", ">= 1", self.micro_batch_rows)
        _check(self.records_per_row >= 0, "data.records_per_row", ">= 0", self.records_per_row)
        _check(self.packing_window >= 0, "data.packing_window", ">= 0", self.packing_window)
        _check(self.prefetch_steps >= 0, "data.prefetch_steps", ">= 0", self.prefetch_steps)
        _check(self.grad_accum_steps >= 1, "data.grad_accum_steps", ">= 1", self.grad_accum_steps)
        _check(
            self.global_batch_rows >= 0, "data.global_batch_rows", ">= 0", self.global_batch_rows
        )
        if self.weights is not None:
            _check(
                len(self.weights) == len(self.paths),
                "data.weights",
                f"one weight per path ({len(self.paths)})",
                self.weights,
            )


@dataclass
class ModelConfig:
    model_type: str = "llama"
    """Any causal-LM model type transformers knows (llama, gpt2, qwen2, mistral, …)."""
    size: str = "tiny"
    """Size preset of pretrain/model.py (tiny, 125m, 350m, 1b, 7b); ignored with init_from."""
    init_from: str = ""
    """Local Hugging Face checkpoint folder to continue pretraining from; empty = from scratch."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra transformers config fields, e.g. {num_hidden_layers: 4}."""
    attn_implementation: Literal["sdpa", "flex_attention", "eager"] = "sdpa"
    """sdpa builds a dense (B,1,T,T) additive mask (CPU); flex_attention a block mask (GPU)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside init_from (only for checkpoints you trust)."""
    lm_loss: Literal["chunked", "full"] = "chunked"
    """chunked: the LM head runs only at labelled positions, a chunk at a time (no rows × T ×
    vocab logits); full: logits at every position, then cross-entropy (the reference path)."""
    lm_loss_chunk_tokens: int = 0
    """Labelled positions per LM-head chunk; 0 = about 2^26 logits per chunk (512 at 128k vocab)."""

    def __post_init__(self):
        _check(
            self.lm_loss_chunk_tokens >= 0,
            "model.lm_loss_chunk_tokens",
            ">= 0",
            self.lm_loss_chunk_tokens,
        )


@dataclass
class JepaConfig:
    objective: Literal["jepa", "stp", "none"] = "jepa"
    """jepa: two-view LLM-JEPA term; stp: single-view semantic tube prediction; none: LM only."""
    lm_weight: float = 1.0
    """γ, weight of the next-token loss."""
    weight: float = 1.0
    """λ, weight of the JEPA (or STP) term; 0 = LM only, the term is still logged."""
    predictor_tokens: int = 1
    """k, predictor tokens appended after the source view; 0 = Pred is the identity."""
    distance: Literal["cosine", "l2", "mse", "infonce"] = "cosine"
    """d(Pred(Enc(A)), Enc(B)); infonce gathers negatives across ranks."""
    infonce_temperature: float = 0.07
    """Softmax temperature of the InfoNCE distance."""
    hidden_layer: int = -1
    """Hidden layer the embeddings are read from; -1 = last, after the final norm."""
    loss_dropout: float = 0.0
    """α, probability that a step is built without JEPA segments (and costs only the LM pass)."""
    stp_triples_per_doc: int = 1
    """STP: random (s < r < t) triples drawn per document segment."""
    readout: Literal["shared", "paper"] = "shared"
    """Where the embeddings' positions stand in the LM loss. shared: Enc(v0) is read at the last
    token of v0 inside the LM document, the position that also predicts the view separator.
    paper: as in the LLM-JEPA reference code, no position read as an embedding carries LM loss:
    on rows with JEPA segments the view closers (separator, eos) are not LM targets, so a model
    trained without LM-only rows (jepa.loss_dropout = 0) never learns to emit eos (generation
    then runs to its token limit; the evaluator's prefix match is made for that)."""
    regularizer: Literal["none", "sigreg", "vicreg"] = "none"
    """Anti-collapse term on the step's view embeddings Enc(A), Enc(B), gathered across ranks:
    sigreg (LeJEPA: toward an isotropic standard Gaussian along random 1-D projections) or
    vicreg (variance and covariance terms)."""
    regularizer_weight: float = 1.0
    """β: the loss adds β × the regularizer (mean over the step's micro-batches)."""
    sigreg_slices: int = 256
    """SIGReg: random projection directions (drawn from the seed and step, equal on all ranks)."""
    sigreg_points: int = 17
    """SIGReg: integration nodes of the Epps–Pulley statistic on [0, sigreg_t_max]."""
    sigreg_t_max: float = 3.0
    """SIGReg: upper end of the integral over t."""
    vicreg_std: float = 1.0
    """VICReg: target standard deviation of every embedding dimension."""
    vicreg_variance_weight: float = 1.0
    """VICReg: weight of the variance (hinge on the std) term."""
    vicreg_covariance_weight: float = 1.0
    """VICReg: weight of the covariance (off-diagonal) term."""
    collapse_warning_cosine: float = 0.99
    """Warn once when the mean cosine between different records' Enc(B) (jepa/cos_b_b) stays
    above this for 5 log steps in a row; 1 = never."""

    def __post_init__(self):
        _check(self.predictor_tokens >= 0, "jepa.predictor_tokens", ">= 0", self.predictor_tokens)
        _check(0.0 <= self.loss_dropout <= 1.0, "jepa.loss_dropout", "in [0, 1]", self.loss_dropout)
        _check(self.weight >= 0, "jepa.weight", ">= 0", self.weight)
        _check(self.lm_weight >= 0, "jepa.lm_weight", ">= 0", self.lm_weight)
        _check(
            self.infonce_temperature > 0,
            "jepa.infonce_temperature",
            "> 0",
            self.infonce_temperature,
        )
        _check(self.regularizer_weight >= 0, "jepa.regularizer_weight", ">= 0",
               self.regularizer_weight)  # fmt: skip
        _check(self.sigreg_slices >= 1, "jepa.sigreg_slices", ">= 1", self.sigreg_slices)
        _check(self.sigreg_points >= 2, "jepa.sigreg_points", ">= 2", self.sigreg_points)
        _check(self.sigreg_t_max > 0, "jepa.sigreg_t_max", "> 0", self.sigreg_t_max)
        _check(self.vicreg_std > 0, "jepa.vicreg_std", "> 0", self.vicreg_std)
        _check(-1 <= self.collapse_warning_cosine <= 1, "jepa.collapse_warning_cosine",
               "in [-1, 1]", self.collapse_warning_cosine)  # fmt: skip
        _check(
            self.stp_triples_per_doc >= 1,
            "jepa.stp_triples_per_doc",
            ">= 1",
            self.stp_triples_per_doc,
        )


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient L2 norm to this; 0 = no clipping."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive bad steps: a non-finite loss or gradient (the update is
    skipped) or a loss spike. The stop names the last good checkpoint (pretrain/health.py)."""
    spike_factor: float = 4.0
    """A step whose LM loss exceeds this × the mean of the last optim.spike_window good steps is
    bad (a spike); 0 = non-finite values only."""
    spike_window: int = 50
    """Good steps in the running mean that spikes are measured against."""
    implementation: Literal["torch", "torch_fused", "deepspeed"] = "torch"
    """torch: PyTorch AdamW (foreach on CUDA) through DeepSpeed's torch_adam, no JIT build;
    torch_fused: PyTorch's fused AdamW kernel; deepspeed: DeepSpeed's FusedAdam / CPUAdam, which
    compile themselves with nvcc / a C++ compiler at start-up."""

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", "> 0", self.lr)
        _check(self.grad_clip_norm >= 0, "optim.grad_clip_norm", ">= 0", self.grad_clip_norm)
        _check(
            self.max_nonfinite_steps >= 1,
            "optim.max_nonfinite_steps",
            ">= 1",
            self.max_nonfinite_steps,
        )
        _check(self.spike_factor == 0 or self.spike_factor > 1, "optim.spike_factor",
               "0 (off) or > 1", self.spike_factor)  # fmt: skip
        _check(self.spike_window >= 1, "optim.spike_window", ">= 1", self.spike_window)


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """Warmup then cosine decay; warmup-stable-decay (linear decay at the end); or constant."""
    train_steps: int = 1000
    """Optimizer steps of the whole run."""
    warmup_steps: int = 100
    """Linear warmup from 0 to optim.lr, in steps."""
    decay_steps: int = 0
    """wsd: length of the final linear decay in steps; 0 = 20% of train_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr."""
    stop_at_step: int = 0
    """Stop (with a checkpoint) once this many steps are done, without changing the schedule;
    for runs split into several jobs. 0 = run to train_steps."""

    def __post_init__(self):
        _check(self.train_steps >= 1, "schedule.train_steps", ">= 1", self.train_steps)
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", ">= 0", self.warmup_steps)
        _check(self.decay_steps >= 0, "schedule.decay_steps", ">= 0", self.decay_steps)
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _check(self.stop_at_step >= 0, "schedule.stop_at_step", ">= 0", self.stop_at_step)


@dataclass
class CheckpointConfig:
    save_every_steps: int = 1000
    """Save a checkpoint every this many steps (and always at the end); 0 = only at the end."""
    keep_last: int = 3
    """Checkpoints kept in run_dir/checkpoints; older ones are deleted."""
    resume: bool = True
    """Resume from run_dir's latest checkpoint when there is one."""
    allow_data_change: bool = False
    """Resume even if the dataset manifest hash differs from the checkpoint's."""
    preempt_check_every_steps: int = 10
    """Agree across ranks on a stop request (a signal) every this many steps: an all-reduce and a
    host sync each time."""

    def __post_init__(self):
        _check(
            self.save_every_steps >= 0, "checkpoint.save_every_steps", ">= 0", self.save_every_steps
        )
        _check(self.keep_last >= 1, "checkpoint.keep_last", ">= 1", self.keep_last)
        _check(
            self.preempt_check_every_steps >= 1,
            "checkpoint.preempt_check_every_steps",
            ">= 1",
            self.preempt_check_every_steps,
        )


@dataclass
class LoggingConfig:
    log_every_steps: int = 10
    """Log scalars every this many steps (each log forces a device sync)."""
    eval_every_steps: int = 500
    """Evaluate on the validation split every this many steps; 0 = never."""
    eval_batches: int = 8
    """Micro-batches per evaluation."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tensorboard."""
    progress_bar: bool = True
    """Rank-0 tqdm bar with loss and tokens/s."""

    def __post_init__(self):
        _check(self.log_every_steps >= 1, "logging.log_every_steps", ">= 1", self.log_every_steps)
        _check(
            self.eval_every_steps >= 0, "logging.eval_every_steps", ">= 0", self.eval_every_steps
        )
        _check(self.eval_batches >= 1, "logging.eval_batches", ">= 1", self.eval_batches)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Folder for checkpoints, TensorBoard events, metrics.jsonl and the resolved config."""
    deepspeed_config: str = "ds_configs/zero3_bf16.json"
    """Static DeepSpeed settings (ZeRO stage, precision, offload); batch and optimizer fields are
    filled from this tree. Relative paths are taken from the repo root."""
    seed: int = 0
    """Seed of model init, data order and loss dropout (identical on all ranks)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    jepa: JepaConfig = field(default_factory=JepaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _check(
            self.schedule.warmup_steps <= self.schedule.train_steps,
            "schedule.warmup_steps",
            f"<= schedule.train_steps ({self.schedule.train_steps})",
            self.schedule.warmup_steps,
        )
        if self.jepa.objective == "jepa" and self.data.seq_len_tokens < 16:
            raise ValueError("data.seq_len_tokens must be >= 16 for JEPA rows")


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {got!r}")


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a recipe or override."""


# --------------------------------------------------------------------------------------------
# Strict merging


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML/JSON or a `key=value` string) as type `tp`, or ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _parse_str(value) if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or value in ("None", "null", "none")):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = _parse_str(value) if value.strip().startswith("[") else value.split(",")
            if isinstance(value, str):
                value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _parse_str(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        # `model.overrides.hidden_size=128` arrives as the string "128": typed by the value type
        _, item = typing.get_args(tp)
        return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _parse_str(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {text!r}: {e}") from e


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _merge(cls: type, base: dict[str, Any], updates: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Merges a nested mapping onto `base` (kwargs of `cls`), strictly."""
    fields = _fields(cls)
    out = dict(base)
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}; known keys: {sorted(fields)}")
        _, tp = fields[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; set its keys ({key}.<name>=…)")
            out[name] = _merge(tp, out.get(name, {}), value, f"{key}.")
        elif typing.get_origin(tp) is dict and isinstance(value, dict):
            # `model.overrides.hidden_size=128` sets one key of the mapping; `model.overrides={…}`
            # (a string) replaces the mapping
            out[name] = {**out.get(name, {}), **_coerce(value, tp, key)}
        else:
            out[name] = _coerce(value, tp, key)
    return out


def _build(cls: type, kwargs: dict[str, Any]) -> Any:
    fields = _fields(cls)
    built = {}
    for name, value in kwargs.items():
        tp = fields[name][1]
        built[name] = _build(tp, value) if dataclasses.is_dataclass(tp) else value
    return cls(**built)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["optim.lr=1e-3", "data.paths=[a,b]"] → {"optim": {"lr": "1e-3"}, "data": {...}}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().lstrip("-").split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return tree


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{path}: not valid YAML: {where}{problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(
    recipe: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Defaults ← recipe file ← dotted overrides, all strict; validated in __post_init__."""
    kwargs: dict[str, Any] = {}
    if recipe is not None:
        kwargs = _merge(TrainConfig, kwargs, load_recipe(recipe), "")
    kwargs = _merge(TrainConfig, kwargs, parse_overrides(list(overrides or [])), "")
    return _build(TrainConfig, kwargs)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, _merge(TrainConfig, {}, data, ""))


# --------------------------------------------------------------------------------------------
# Derived values


def resolve_path(path: str | Path) -> Path:
    """A relative path that does not exist from the working directory is taken from the repo root."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


def global_batch_rows(cfg: TrainConfig, world_size: int) -> int:
    """micro × accumulation × world, asserted against data.global_batch_rows when that is set."""
    derived = cfg.data.micro_batch_rows * cfg.data.grad_accum_steps * world_size
    if cfg.data.global_batch_rows and cfg.data.global_batch_rows != derived:
        raise ValueError(
            f"data.global_batch_rows={cfg.data.global_batch_rows} but micro_batch_rows "
            f"({cfg.data.micro_batch_rows}) × grad_accum_steps ({cfg.data.grad_accum_steps}) × "
            f"world size ({world_size}) = {derived}"
        )
    return derived


def _deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = (
            _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The static JSON of cfg.deepspeed_config with batch, clipping and optimizer fields filled
    from the tree. The JSON may preset optimizer params the tree does not own (torch_adam)."""
    path = resolve_path(cfg.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"deepspeed_config: {path} not found")
    try:
        static = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"deepspeed_config: {path} is not valid JSON: line {e.lineno}: {e.msg}"
        ) from None
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
    ):
        if key in static:
            raise ConfigError(
                f"{cfg.deepspeed_config}: {key} is filled from the config tree; remove it"
            )
    o = cfg.optim
    adam = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}
    if o.implementation != "deepspeed":
        adam["torch_adam"] = True  # torch.optim.AdamW: nothing to compile at start-up
        if o.implementation == "torch_fused":
            adam["fused"] = True
    filled = {
        "train_batch_size": global_batch_rows(cfg, world_size),
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_rows,
        "gradient_accumulation_steps": cfg.data.grad_accum_steps,
        "gradient_clipping": o.grad_clip_norm,
        "optimizer": {"type": "AdamW", "params": adam},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    ds = _deep_update(static, filled)
    if o.implementation == "deepspeed":
        ds["optimizer"]["params"].pop("torch_adam", None)
    if precision(ds) != "fp32":
        # 16-bit compute, fp32 gradients: accumulated over micro-steps and reduced across ranks
        # in fp32 (DeepSpeed's default for both is the compute dtype). A JSON may still say otherwise.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
    assert (
        ds["train_batch_size"]
        == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    )
    return ds


def precision(ds_config: dict[str, Any]) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
