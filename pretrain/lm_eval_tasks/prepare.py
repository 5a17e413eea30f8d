"""Make an exported model readable by lm-evaluation-harness: `python -m pretrain.lm_eval_tasks.prepare MODEL_DIR`.

The tasks in this folder prompt with `[bos] A [view_sep]`, the LM document's format in training,
and score the decoded generation as pretrain/evaluate.py does. The harness only hands the model
text and reads text back, so the exported tokenizer does not fit it:
  - it never turns text into a special token (`split_special_tokens`, on purpose: user data must
    not inject one), so no prompt text encodes to the bos and view_sep ids;
  - the harness decodes with skip_special_tokens, which would drop a view_sep or predictor token
    that the model generates before eos, where pretrain.evaluate keeps its text (a miss).
pretrain.export writes a copy of the tokenizer for the harness, MODEL_DIR/lm_eval_tokenizer, with
this module's function; this command writes it for a folder exported before it did:
`split_special_tokens` false, and every added token marked non-special in tokenizer.json
(transformers keeps bos, eos, pad and unk special whatever the file says; the harness cuts at
eos). Vocabulary, merges, normaliser and decoder are the exported ones. Use it through the
harness's `tokenizer=` model argument:

    lm_eval --model hf --model_args pretrained=MODEL_DIR,tokenizer=MODEL_DIR/lm_eval_tokenizer ...

The task checks, pair by pair, that this tokenizer encodes every prompt to exactly the ids
pretrain.evaluate feeds the model, so a description that contains a special token's text is
refused, not silently turned into a control token.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pretrain/lm_eval_tasks/prepare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_pipeline.tokenizer import TOKENIZATION_FILES  # noqa: E402

HARNESS_TOKENIZER_DIR = "lm_eval_tokenizer"


def write_harness_tokenizer(model_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Writes the harness's copy of MODEL_DIR's tokenizer to OUT_DIR (default
    MODEL_DIR/lm_eval_tokenizer); returns OUT_DIR. See the module docstring."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir else model_dir / HARNESS_TOKENIZER_DIR
    config_path, backend_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not backend_path.is_file() or not config_path.is_file():
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer.json/tokenizer_config.json (not an exported model folder)"
        )
    config = json.loads(config_path.read_text())
    config["split_special_tokens"] = False
    backend = json.loads(backend_path.read_text())
    for token in backend.get("added_tokens", []):
        token["special"] = False
    for token in config.get("added_tokens_decoder", {}).values():  # where a config lists them
        token["special"] = False
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZATION_FILES:
        if name not in ("tokenizer.json", "tokenizer_config.json") and (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    _write_json(out / "tokenizer.json", backend)
    _write_json(out / "tokenizer_config.json", config)
    return out


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.lm_eval_tasks.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model_dir", help="a folder written by python -m pretrain.export")
    parser.add_argument("--out", default=None, help=f"default MODEL_DIR/{HARNESS_TOKENIZER_DIR}")
    args = parser.parse_args(argv)
    try:
        out = write_harness_tokenizer(args.model_dir, args.out)
    except (OSError, ValueError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
    print(f"harness tokenizer: {out}\n"
          f"  lm_eval --model hf --model_args pretrained={args.model_dir},tokenizer={out} "
          "--include_path pretrain/lm_eval_tasks --tasks nlrx_synth")  # fmt: skip


if __name__ == "__main__":
    main()
