"""Model + DeepSpeed: build (or load) the transformers model under ZeRO-3 and wrap it in an engine.

The model code (pretrain/model.py) knows nothing of DeepSpeed; this module is where ZeRO-3 meets
it: `HfDeepSpeedConfig` is created before the model so transformers builds (or loads) it inside
`deepspeed.zero.Init` and every rank only ever materialises its own partition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain import model as model_lib
from pretrain.config import ConfigError, TrainConfig, precision
from pretrain.objective import Objective

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class SpecialIdsInfo:
    vocab_size: int
    bos: int
    eos: int
    pad: int


# transformers config keys that set the shape of weights: an override of one cannot apply to a
# checkpoint loaded with model.init_from.
SHAPE_KEYS = frozenset({
    "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
    "tie_word_embeddings",
})  # fmt: skip


def build_hf_config(cfg: TrainConfig, vocab: SpecialIdsInfo) -> Any:
    """The transformers config of the run: a size preset from scratch, or init_from's config
    with model.overrides applied (the model is loaded with it)."""
    m = cfg.model
    if m.init_from:
        from transformers import AutoConfig

        local = Path(m.init_from)
        if (local.is_absolute() or m.init_from.startswith(".") or local.exists()) and not (
            local / "config.json"
        ).is_file():  # (else transformers takes it for a Hub repo id, and says so in a traceback)
            raise ConfigError(f"model.init_from={m.init_from}: not a Hugging Face checkpoint "
                              "folder (no config.json)")  # fmt: skip
        hf = AutoConfig.from_pretrained(m.init_from, trust_remote_code=m.trust_remote_code)
        for k, v in m.overrides.items():
            if k in SHAPE_KEYS and getattr(hf, k, v) != v:
                raise ConfigError(
                    f"model.overrides.{k}={v}: {m.init_from} has {k}={getattr(hf, k)}; a "
                    "checkpoint's shapes cannot be overridden (remove the override)"
                )
            setattr(hf, k, v)
        return hf
    return model_lib.build_model_config(
        model_type=m.model_type,
        size=m.size,
        vocab_size=vocab.vocab_size,
        max_position_embeddings=max(cfg.data.seq_len_tokens, 128),
        attn_implementation=m.attn_implementation,
        overrides=dict(m.overrides) or None,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        pad_token_id=vocab.pad,
    )


def count_parameters(hf_config: Any) -> tuple[int, int]:
    """(all parameters, embedding parameters) of the model, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return n, emb


def estimate_memory(n_params: int, ds_config: dict, world_size: int) -> dict[str, float]:
    """Per-GPU bytes of model states under ZeRO-3 (activations and buffers not included).

    Mixed precision keeps a 16-bit copy of the weights and gradients on the GPU and fp32 master
    weights + Adam moments (12 bytes/param) in the optimizer; fp32 keeps 4 + 4 + 8. ZeRO-3 divides
    all three by the world size; offload moves the optimizer states (and params) to CPU memory."""
    prec = precision(ds_config)
    zero = ds_config.get("zero_optimization", {})
    w = BYTES[prec]
    optim_bytes = (12 if prec != "fp32" else 8) * n_params
    est = {
        "params_gib": w * n_params / world_size,
        "grads_gib": w * n_params / world_size,
        "optimizer_gib": optim_bytes / world_size,
    }
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        est["cpu_optimizer_gib"], est["optimizer_gib"] = est["optimizer_gib"], 0.0
    if zero.get("offload_param", {}).get("device", "none") != "none":
        est["cpu_params_gib"], est["params_gib"] = est["params_gib"], 0.0
    est = {k: v / 2**30 for k, v in est.items()}
    est["total_gpu_gib"] = est["params_gib"] + est["grads_gib"] + est["optimizer_gib"]
    return est


def build_model(cfg: TrainConfig, hf_config: Any, vocab: SpecialIdsInfo) -> torch.nn.Module:
    """Builds or loads the model. Call while an HfDeepSpeedConfig is alive (ZeRO-3 partitioning)."""
    m = cfg.model
    torch.manual_seed(cfg.seed)  # identical init on every rank
    if m.init_from:
        model = model_lib.load_pretrained(
            m.init_from,
            config=hf_config,
            vocab_size=vocab.vocab_size,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
    else:
        model = model_lib.build_model(hf_config)
    if m.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on vectors (norm weights, biases). Uses ds_shape under ZeRO-3, where
    `p.shape` is the (empty) local partition."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(cfg: TrainConfig, ds_config: dict, vocab: SpecialIdsInfo, run_dir: Path):
    """(engine, hf_config). Saves the model's transformers config to run_dir/hf_config."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = build_hf_config(cfg, vocab)
    dschf = HfDeepSpeedConfig(ds_config)  # must be alive while the model is built or loaded
    model = build_model(cfg, hf_config, vocab)
    # DeepSpeed wraps the objective, not the bare model: the LM head runs inside the wrapped
    # forward (where ZeRO-3 gathers it) and only at the labelled positions.
    objective = Objective(model, cfg.jepa, cfg.model)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=param_groups(objective, cfg.optim.weight_decay),
        config=ds_config,
    )
    engine._hf_ds_config = dschf  # keep it alive as long as the engine
    return engine, model.config


def setup_warnings(cfg: TrainConfig, ds_config: dict) -> list[str]:
    """Warnings about a GPU setup that works but wastes the GPU."""
    warnings = []
    gpu = torch.cuda.is_available() or precision(ds_config) != "fp32"
    if gpu and cfg.model.attn_implementation == "sdpa" and cfg.data.seq_len_tokens > 2048:
        warnings.append(
            f"model.attn_implementation=sdpa with data.seq_len_tokens={cfg.data.seq_len_tokens}: "
            "packed rows become a dense (rows, 1, T, T) mask (O(T²) memory, no fused kernel); "
            "use flex_attention on GPUs"
        )
    return warnings


def save_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
