"""Export a run to Hugging Face format: `python -m pretrain.export RUN_DIR OUT_DIR [--tag step_000100]`.

Gathers the ZeRO-3 partitions of a checkpoint (the latest by default) into one fp32 state dict
(DeepSpeed's zero_to_fp32), loads it into the run's transformers config, and writes
`save_pretrained` files plus the run's tokenizer, so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR); AutoTokenizer.from_pretrained(OUT_DIR)

work offline. Runs in one CPU process; no process group needed. The run's tokenizer must fit the
model's vocabulary; it is checked before the (slow) gather, and a mismatch is one line, exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pretrain/export.py` puts pretrain/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.checkpoint import (  # noqa: E402
    UnsafeCheckpointError,
    checkpoint_root,
    find_latest,
    safe_loading,
)


class ExportError(ValueError):
    """The run cannot be exported as it is (the user's to fix): printed as one line."""


def export(
    run_dir: str | Path, out_dir: str | Path, tag: str | None = None, dtype: str = "float32"
) -> Path:
    """Writes OUT_DIR; returns it. dtype: weights as saved (float32 or bfloat16)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if tag is None:
        latest = find_latest(run_dir)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_root(run_dir)}")
        tag = latest.name
    config = AutoConfig.from_pretrained(run_dir / "hf_config")
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise ExportError(f"{tok_dir}: no tokenizer (the shard folder had none when the run "
                          "started): copy there the tokenizer the shards were made with")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    check_tokenizer_fits(tok_dir, len(tokenizer), config.vocab_size, _from_checkpoint(run_dir))
    with safe_loading():  # a run_dir from elsewhere cannot run code here (weights_only loads)
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root(run_dir)), tag=tag)
    # The exported model is for users: the packed-row flex path is a training concern.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = _unwrap_objective(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint/model mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.config.use_cache = True
    model.to(getattr(torch, dtype))
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # lm-evaluation-harness reads the model through text only: its tokenizer copy (see there)
    from pretrain.lm_eval_tasks.prepare import write_harness_tokenizer

    write_harness_tokenizer(out_dir)
    print(
        f"exported {run_dir}/checkpoints/{tag} → {out_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return out_dir


def check_tokenizer_fits(
    tok_dir: Path, n_tokens: int, model_vocab: int, from_checkpoint: bool
) -> None:
    """A tokenizer larger than the embedding would produce ids without a row. One smaller is
    allowed only when the run started from a checkpoint (init_from), whose embedding may be
    padded (Qwen2: 151,665 tokens, 151,936 rows; pretrain/model.py never shrinks it); a model
    built from scratch has exactly its tokenizer's vocabulary."""
    if n_tokens > model_vocab or (n_tokens < model_vocab and not from_checkpoint):
        why = "" if from_checkpoint else " (built from scratch for the run's tokenizer)"
        raise ExportError(
            f"{tok_dir}: {n_tokens} tokens, but the model's embedding has {model_vocab} rows"
            f"{why}: not the tokenizer this model was trained with"
        )


def _from_checkpoint(run_dir: Path) -> bool:
    """Whether the run started from a pretrained checkpoint (model.init_from in its config)."""
    return bool(json.loads((run_dir / "config.json").read_text())["model"]["init_from"])


def _unwrap_objective(state: dict, model_keys: set[str]) -> dict:
    """DeepSpeed wraps pretrain.objective.Objective, which holds the transformers model as
    `model`: parameter names carry a "model." prefix. Checkpoints written before the objective
    module (the bare model under DeepSpeed) have none; both export."""
    stripped = {k.removeprefix("model."): v for k, v in state.items()}
    if not set(state) <= model_keys and set(stripped) <= model_keys:
        return stripped
    return state


def main(run_dir: str, out_dir: str, tag: str | None = None, dtype: str = "float32") -> None:
    try:
        export(run_dir, out_dir, tag, dtype)
    except (ExportError, FileNotFoundError, UnsafeCheckpointError) as e:  # one line, exit 2
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    import fire

    fire.Fire(main)
