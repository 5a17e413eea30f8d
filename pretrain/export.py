"""Export a run to Hugging Face format: `python -m pretrain.export RUN_DIR OUT_DIR [--tag step_000100]`.

Gathers the ZeRO-3 partitions of a checkpoint (the latest by default) into one fp32 state dict
(DeepSpeed's zero_to_fp32), loads it into the run's transformers config, and writes
`save_pretrained` files plus the run's tokenizer, so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR); AutoTokenizer.from_pretrained(OUT_DIR)

work offline. Runs in one CPU process; no process group needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pretrain/export.py` puts pretrain/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.checkpoint import checkpoint_root, find_latest  # noqa: E402


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
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root(run_dir)), tag=tag)
    config = AutoConfig.from_pretrained(run_dir / "hf_config")
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
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(
        f"exported {run_dir}/checkpoints/{tag} → {out_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return out_dir


def _unwrap_objective(state: dict, model_keys: set[str]) -> dict:
    """DeepSpeed wraps pretrain.objective.Objective, which holds the transformers model as
    `model`: parameter names carry a "model." prefix. Checkpoints written before the objective
    module (the bare model under DeepSpeed) have none; both export."""
    stripped = {k.removeprefix("model."): v for k, v in state.items()}
    if not set(state) <= model_keys and set(stripped) <= model_keys:
        return stripped
    return state


def main(run_dir: str, out_dir: str, tag: str | None = None, dtype: str = "float32") -> None:
    export(run_dir, out_dir, tag, dtype)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
