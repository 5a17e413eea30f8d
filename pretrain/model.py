"""Model construction and the packed-row forward pass. Knows nothing of DeepSpeed: the engine
keeps `HfDeepSpeedConfig` alive around `build_model` / `load_pretrained` so ZeRO-3 partitions the
weights as they are created; pretrain/objective.py runs the model over packed rows (its full-logits
reference path through `forward_batch`, which evaluation and the tests use too)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from pretrain.attention import build_attention

logger = logging.getLogger(__name__)

# Llama-style shapes under generic transformers names. kv heads < heads is grouped-query attention.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
    "125m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
    ),
    "350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=2816,
    ),
    "1b": dict(  # Llama-3.2-1B
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
    ),
    "7b": dict(  # Llama-2-7B
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
    ),
}

# Generic keys a model type spells differently and does not alias in its config's
# `attribute_map` (GPT-2's n_embd, n_layer, n_head, n_positions are aliased there already).
_KEY_ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {"intermediate_size": "n_inner"},
    "gptj": {"intermediate_size": "n_inner"},
    "opt": {"intermediate_size": "ffn_dim"},
    "falcon": {"intermediate_size": "ffn_hidden_size"},
}


def _config_attributes(model_type: str) -> set[str]:
    """Attribute names a model type's config accepts: its fields plus `attribute_map` aliases."""
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type {model_type!r} is not a transformers model type")
    cls = CONFIG_MAPPING[model_type]
    return set(getattr(cls, "__dataclass_fields__", {})) | set(cls.attribute_map)


def _architecture_kwargs(model_type: str, size: str, max_position_embeddings: int) -> dict:
    """The size preset under model_type's attribute names. Keys the model type hard-codes are
    dropped with a warning (GPT-2 has no grouped-query attention: it gets full multi-head)."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"size must be one of {sorted(SIZE_PRESETS)}, got {size!r}")
    known = _config_attributes(model_type)
    aliases = _KEY_ALIASES.get(model_type, {})
    generic = {**SIZE_PRESETS[size], "max_position_embeddings": max_position_embeddings}
    kwargs = {}
    for key, value in generic.items():
        name = aliases.get(key, key)
        if name in known:
            kwargs[name] = value
        else:
            logger.warning("model_type %s has no %s; dropping %s=%s", model_type, key, key, value)
    return kwargs


def build_model_config(
    model_type: str = "llama",
    size: str = "tiny",
    *,
    vocab_size: int,
    max_position_embeddings: int,
    attn_implementation: str = "sdpa",
    overrides: dict | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedConfig:
    """A from-scratch config: size preset + the tokenizer's full vocab (special tokens included)
    + overrides (config attribute names of model_type; an unknown name is an error)."""
    kwargs = _architecture_kwargs(model_type, size, max_position_embeddings)
    known = _config_attributes(model_type)
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ValueError(f"overrides: {model_type} config has no attribute {key!r}")
        kwargs[key] = value
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attn_implementation=attn_implementation,
        **kwargs,
    )


def build_model(config: PreTrainedConfig) -> torch.nn.Module:
    """Randomly initialised causal LM (under zero.Init when the engine has ZeRO-3 set up)."""
    return AutoModelForCausalLM.from_config(config)


def _check_vocab(config: PreTrainedConfig, vocab_size: int, path: str) -> None:
    """A tokenizer that cannot produce the model's own special token ids belongs to another
    model; its ids would index the wrong (or missing) embedding rows."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(config, name, None)
        for token_id in ids if isinstance(ids, list) else [ids]:
            if token_id is not None and token_id >= vocab_size:
                raise ValueError(
                    f"tokenizer/model vocabulary mismatch: the tokenizer has {vocab_size} tokens "
                    f"but {path} uses {name}={token_id}; use the checkpoint's own tokenizer "
                    "(plus added predictor tokens)"
                )


def load_pretrained(
    path: str | Path,
    vocab_size: int,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    config: PreTrainedConfig | None = None,
) -> torch.nn.Module:
    """A local Hugging Face checkpoint (with `config` instead of its own, when given: the
    engine's, with model.overrides applied), with its embeddings grown to the tokenizer's vocab_size
    when tokens (the predictors) were added. A smaller tokenizer is fine when the checkpoint pads
    its vocab (Qwen2: 151,665 tokens, 151,936 embedding rows): embeddings are never shrunk.

    Added rows (input embedding, and the LM head when it is not tied) are the mean of the
    checkpoint's rows (`init_new_rows`): the model's next-token distribution barely moves, and
    the rows are the same on every rank and every rerun.

    dtype: weights as loaded (from_pretrained's own default is the checkpoint's dtype); fp32
    master weights, the engine's bf16 mode casts the compute copy."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no local Hugging Face checkpoint directory at {path}")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        local_files_only=True,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
    )
    _check_vocab(model.config, vocab_size, str(path))
    # num_embeddings is module metadata: correct even when ZeRO-3 has partitioned the weight.
    old_rows = model.get_input_embeddings().num_embeddings
    if vocab_size > old_rows:
        # resize gathers ZeRO-3 partitions itself and returns whole (not yet partitioned) new
        # weights; its mean_resizing would draw the rows from N(mean, 1e-9·covariance) with
        # the global RNG, so the mean is set exactly instead.
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        init_new_rows(model, old_rows)
    return model


def init_new_rows(model: torch.nn.Module, old_rows: int) -> None:
    """Rows old_rows.. of the input embedding and of the LM head (weight and bias, if untied)
    become the mean of rows ..old_rows (transformers' mean_resizing without its noise)."""
    head = model.get_output_embeddings()
    tensors = [model.get_input_embeddings().weight]
    if head is not None:
        tensors += [head.weight, getattr(head, "bias", None)]
    seen = set()
    with torch.no_grad():
        for t in tensors:
            if t is None or id(t) in seen:  # tied: the head is the embedding
                continue
            seen.add(id(t))
            if t.shape[0] <= old_rows:  # a ZeRO-3 partition: resize did not leave it whole
                raise RuntimeError(f"cannot set the new rows of a {tuple(t.shape)} tensor")
            t[old_rows:] = t[:old_rows].mean(0, dtype=torch.float64).to(t.dtype)


def check_init_from(
    path: str | Path, tokenizer_dir: str | Path, vocab_size: int, trust_remote_code: bool = False
) -> list[str]:
    """Whether the run's tokenizer (the shards', vocab_size tokens) belongs to the checkpoint at
    path: its own tokenizer, or that one extended (`python -m data_pipeline.tokenizer extend`).
    Returns warnings; raises ValueError (one line) when it does not. Reads files only."""
    from data_pipeline.tokenizer import extension_mismatch, read_vocab

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model.init_from={path}: not a Hugging Face checkpoint folder "
                         "(no config.json)")  # fmt: skip
    config = AutoConfig.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    _check_vocab(config, vocab_size, str(path))
    base = read_vocab(path)
    if base is None:
        return [f"model.init_from={path} has no tokenizer: cannot check that the shards' "
                f"tokenizer ({tokenizer_dir}) is the one the model was trained with; going on"]  # fmt: skip
    vocab = read_vocab(tokenizer_dir)
    if vocab is None:
        raise ValueError(f"{tokenizer_dir}: no tokenizer (the shards' tokenizer folder)")
    why = extension_mismatch(base, vocab)
    if why is not None:
        raise ValueError(
            f"the shards' tokenizer ({tokenizer_dir}) is not the tokenizer of model.init_from="
            f"{path} nor an extension of it: {why}; make the shards with "
            f"`python -m data_pipeline.tokenizer extend --src {path} --out TOK_DIR` and "
            "`python -m data_pipeline.preprocess --tokenizer TOK_DIR ...`"
        )
    return []


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """Dtype the attention scores are computed in: autocast's if active, else the weights'."""
    param = next(model.parameters())
    if torch.is_autocast_enabled(param.device.type):
        return torch.get_autocast_dtype(param.device.type)
    return param.dtype


def forward_batch(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    attn_impl: str,
    hidden_layer: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a collated packed batch: (logits (B, T, V), hidden (B, T, H) of hidden_layer).

    hidden_layer indexes `hidden_states`: 0 = embeddings, i = output of block i, -1 = last block
    after the final norm (transformers' capture_outputs replaces hidden_states[-1] with
    last_hidden_state). model may be the DeepSpeed engine: it is called, never unwrapped."""
    # The engine's own `config` is DeepSpeed's; the HF config lives on the wrapped module.
    model_impl = getattr(getattr(model, "module", model).config, "_attn_implementation", None)
    if model_impl != attn_impl:
        raise ValueError(f"attn_impl={attn_impl!r} but the model was built with {model_impl!r}")
    mask = build_attention(batch, attn_impl, compute_dtype(model))
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=mask,
        use_cache=False,
        # An index list keeps only that layer (transformers >= 5); a model that predates
        # selection reads it as True and returns every layer, which indexes the same.
        output_hidden_states=[hidden_layer],
        return_dict=True,
    )
    hidden = out.hidden_states[hidden_layer]
    if hidden is None:
        raise ValueError(f"hidden_layer={hidden_layer} is out of range for this model")
    return out.logits, hidden
