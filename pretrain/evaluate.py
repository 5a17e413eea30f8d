"""Evaluate an exported model on two-view data: `python -m pretrain.evaluate MODEL_DIR DATA.jsonl`.

MODEL_DIR is a Hugging Face folder (`python -m pretrain.export`) whose tokenizer has this project's
special tokens; DATA is anything the pipeline reads (JSONL, .jsonl.gz, Parquet, a save_to_disk
folder) with the same --views options as `data_pipeline.preprocess`.

Generation: greedy decoding of view B from the prompt `[bos] A [view_sep]`, the LM document's
format in training, up to eos or --max_new_tokens. Scores, in % of pairs:
    exact_match    the generation (up to eos) equals B, both stripped of surrounding whitespace
    prefix_match   the generation starts with B: the paper's score for from-scratch models,
                   which do not learn to stop

Representations of the same pairs (the paper's analysis), Enc(X) being the hidden state of
--hidden_layer (-1: last, after the final norm) at the last token of `[bos] X`, as in training:
    cosine               mean cos(Enc(A), Enc(B)); cosine_shuffled pairs A with another B
    pred_cosine          mean cos(Pred(Enc(A)), Enc(B)), Pred = `[bos] A [P1..Pk]` (k > 0 only);
                         pred_cosine_shuffled pairs Pred with another B: as high = collapse
    lstsq_residual       ||Enc(A) W − Enc(B)||_F for the least-squares W (H × H), and divided by
                         ||Enc(B)||_F (lstsq_residual_relative); the paper reports the former
    collapse checks      cosine_b_b: mean cos(Enc(B_i), Enc(B_j)), near 1 = every B embedded alike;
                         lstsq_residual_centered: an affine map's residual over ||Enc(B) − mean||_F
                         (= sqrt(1 − R²)): near 1 = Enc(A) predicts nothing beyond the mean
    singular_values      of Enc(A) − Enc(B) (N × H), largest first

Prints a table; writes everything as JSON to --out (default MODEL_DIR/eval_<data name>.json),
with the first --show_examples generations. Records without the two views are skipped and counted.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # `python pretrain/evaluate.py` puts pretrain/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.sources import (  # noqa: E402
    InputError,
    SkipRecord,
    ViewSpec,
    expand_inputs,
    iter_unit,
    plan_units,
)
from data_pipeline.tokenizer import encode_views, special_token_ids  # noqa: E402


class EvalError(Exception):
    """Bad input: reported as one line, exit 2."""


@dataclass
class Pairs:
    a: list[list[int]]  # token ids of view A (no specials)
    b: list[list[int]]
    b_text: list[str]  # view B as written in the data: the reference
    a_text: list[str]
    skipped: Counter
    first_skips: list[str]


def read_pairs(
    data: str, tok, views: str = "messages", view_a: int = 0, view_b: int = 1,
    system_prompt: str = "drop", limit: int = 0,
) -> Pairs:  # fmt: skip
    """Views A and B of every valid record, in file order (the first `limit` if > 0)."""
    spec = ViewSpec.parse(views, system_prompt)
    if max(view_a, view_b) >= len(spec.names) or view_a == view_b or min(view_a, view_b) < 0:
        raise EvalError(f"--view_a {view_a} / --view_b {view_b}: views are {list(spec.names)}")
    try:
        paths = expand_inputs(data)
    except InputError as e:
        raise EvalError(str(e)) from e
    a_text, b_text, skipped, first = [], [], Counter(), []
    for unit in plan_units(paths, shard_bytes=1 << 62):
        for where, record in iter_unit(unit):
            try:
                if isinstance(record, SkipRecord):
                    raise record
                texts = spec.extract(record)
            except SkipRecord as e:
                skipped[e.reason] += 1
                if len(first) < 5:
                    first.append(f"{where}: {e.reason} {e.detail}".rstrip())
                continue
            a_text.append(texts[view_a])
            b_text.append(texts[view_b])
            if limit and len(a_text) == limit:
                break
        if limit and len(a_text) == limit:
            break
    if not a_text:
        raise EvalError(
            f"{data}: no record has views {view_a} and {view_b} (skipped {dict(skipped)})"
        )
    a, b = encode_views(tok, a_text), encode_views(tok, b_text)
    return Pairs(a, b, b_text, a_text, skipped, first)


# ----------------------------------------------------------------------------- generation


def _buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of equal length: no padding, so batched greedy decoding is
    exactly per-example decoding whatever the model's handling of padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) == batch_size or lengths[cur[0]] != lengths[i]):
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + [cur] if cur else batches


@torch.no_grad()
def generate(
    model, sp: dict, pairs: Pairs, batch_size: int, max_new_tokens: int, bar
) -> list[list[int]]:
    """Greedy continuation of `[bos] A [sep]` per pair, cut at the first eos."""
    prompts = [[sp["bos"], *a, sp["view_sep"]] for a in pairs.a]
    out: list[list[int]] = [[] for _ in prompts]
    dev = next(model.parameters()).device
    budgets = [max_new_tokens or len(b) + 8 for b in pairs.b]
    for idx in _buckets([len(p) for p in prompts], batch_size):
        ids = torch.tensor([prompts[i] for i in idx], device=dev)
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=max(budgets[i] for i in idx),
            do_sample=False, eos_token_id=sp["eos"], pad_token_id=sp["pad"],
        )[:, ids.shape[1]:].tolist()  # fmt: skip
        for i, g in zip(idx, gen):
            g = g[: budgets[i]]
            out[i] = g[: g.index(sp["eos"])] if sp["eos"] in g else g
        bar.update(len(idx))
    return out


# ----------------------------------------------------------------------------- representations


@torch.no_grad()
def last_token_states(
    model, seqs: list[list[int]], batch_size: int, hidden_layer: int, bar
) -> np.ndarray:
    """(N, H) hidden states of `hidden_layer` at the last token of each sequence (right-padded
    batches: under causal attention the last real token never sees the padding)."""
    dev = next(model.parameters()).device
    rows = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[hidden_layer]
        last = torch.tensor([len(seqs[i]) - 1 for i in idx], device=dev)
        rows.append(hidden[torch.arange(len(idx), device=dev), last].double().cpu())
        bar.update(len(idx))
    states = torch.cat(rows).numpy()
    return states[np.argsort(order)]  # back to the pairs' order


def _mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    nx = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean(np.sum(x * y, axis=1) / np.maximum(nx, 1e-12)))


def _shuffle(n: int) -> np.ndarray:
    """A fixed permutation pairing each A with another record's B (the chance-level baseline)."""
    return np.random.default_rng(0).permutation(n)


def representation_metrics(enc_a: np.ndarray, enc_b: np.ndarray, top: int) -> dict:
    """The paper's metrics of the map Enc(A) → Enc(B); N should exceed H (else W fits exactly).
    Two checks for collapse beside them: how alike the B embeddings are among themselves, and
    the residual of an affine map relative to the spread of Enc(B) around its mean (a constant
    Enc(B) is trivially predictable: the paper's residual alone would call it a perfect map)."""
    w, *_ = np.linalg.lstsq(enc_a, enc_b, rcond=None)
    residual = float(np.linalg.norm(enc_a @ w - enc_b))
    with_bias = np.hstack([enc_a, np.ones((len(enc_a), 1))])
    wb, *_ = np.linalg.lstsq(with_bias, enc_b, rcond=None)
    spread = float(np.linalg.norm(enc_b - enc_b.mean(0)))
    shuffled = _shuffle(len(enc_b))
    svals = np.linalg.svd(enc_a - enc_b, compute_uv=False)
    return {
        "cosine": _mean_cosine(enc_a, enc_b),
        "cosine_shuffled": _mean_cosine(enc_a, enc_b[shuffled]),
        "cosine_b_b": _mean_cosine(enc_b, enc_b[shuffled]),
        "lstsq_residual": residual,
        "lstsq_residual_relative": residual / max(float(np.linalg.norm(enc_b)), 1e-12),
        "lstsq_residual_centered": float(np.linalg.norm(with_bias @ wb - enc_b))
        / max(spread, 1e-12),
        "lstsq_well_posed": bool(len(enc_a) > enc_a.shape[1] + 1),
        "singular_values": [float(s) for s in svals[:top]],
    }


# ----------------------------------------------------------------------------- driver


def _load(model_dir: Path, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    try:
        sp = special_token_ids(tok)
    except ValueError as e:
        raise EvalError(f"{model_dir}: {e}") from e
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=getattr(torch, dtype)
    )
    return tok, sp, model.to(device).eval()


def evaluate(
    model_dir: str | Path,
    data: str,
    *,
    views: str = "messages",
    view_a: int = 0,
    view_b: int = 1,
    system_prompt: str = "drop",
    predictor_tokens: int = 0,
    hidden_layer: int = -1,
    batch_size: int = 64,
    max_new_tokens: int = 0,
    limit: int = 0,
    top_singular: int = 32,
    show_examples: int = 8,
    device: str = "",
    dtype: str = "float32",
    progress: bool = True,
) -> dict:
    """All metrics as a dict (see the module docstring). max_new_tokens 0 = per pair, the
    reference's length in tokens + 8."""
    from tqdm.auto import tqdm

    model_dir = Path(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok, sp, model = _load(model_dir, device, dtype)
    if predictor_tokens > len(sp["predictors"]):
        raise EvalError(
            f"--predictor_tokens {predictor_tokens}: the tokenizer has {len(sp['predictors'])}"
        )
    pairs = read_pairs(data, tok, views, view_a, view_b, system_prompt, limit)
    n = len(pairs.a)
    t0 = time.perf_counter()
    passes = 3 + (predictor_tokens > 0)  # generation, Enc(A), Enc(B), Pred(Enc(A))
    with tqdm(total=passes * n, desc="evaluate", unit="seq", disable=not progress) as bar:
        gen_ids = generate(model, sp, pairs, batch_size, max_new_tokens, bar)
        enc_a = last_token_states(
            model, [[sp["bos"], *a] for a in pairs.a], batch_size, hidden_layer, bar
        )
        enc_b = last_token_states(
            model, [[sp["bos"], *b] for b in pairs.b], batch_size, hidden_layer, bar
        )
        pred = None
        if predictor_tokens > 0:
            tail = sp["predictors"][:predictor_tokens]
            pred = last_token_states(
                model, [[sp["bos"], *a, *tail] for a in pairs.a], batch_size, hidden_layer, bar
            )
    gens = [tok.decode(g) for g in gen_ids]
    refs = [r.strip() for r in pairs.b_text]
    exact = [g.strip() == r for g, r in zip(gens, refs)]
    prefix = [g.strip().startswith(r) for g, r in zip(gens, refs)]
    result = {
        "model": str(model_dir),
        "data": str(data),
        "pairs": n,
        "skipped": dict(pairs.skipped),
        "first_skips": pairs.first_skips,
        "exact_match": 100.0 * float(np.mean(exact)),
        "prefix_match": 100.0 * float(np.mean(prefix)),
        **representation_metrics(enc_a, enc_b, top_singular),
        "pred_cosine": None if pred is None else _mean_cosine(pred, enc_b),
        # near pred_cosine: Pred matches any B as well as its own (a collapsed predictor)
        "pred_cosine_shuffled": None if pred is None else _mean_cosine(pred, enc_b[_shuffle(n)]),
        "hidden_layer": hidden_layer,
        "predictor_tokens": predictor_tokens,
        "seconds": time.perf_counter() - t0,
        "examples": [
            {
                "a": pairs.a_text[i],
                "b": pairs.b_text[i],
                "generated": gens[i],
                "exact": exact[i],
                "prefix": prefix[i],
            }  # fmt: skip
            for i in range(min(show_examples, n))
        ],
    }
    return result


def format_table(r: dict) -> str:
    sv = r["singular_values"]
    rows = [
        ("pairs", f"{r['pairs']}" + (f"  (skipped {r['skipped']})" if r["skipped"] else "")),
        ("exact match", f"{r['exact_match']:.2f} %"),
        ("prefix match", f"{r['prefix_match']:.2f} %"),
        ("cos(Enc(A), Enc(B))", f"{r['cosine']:.4f}  (shuffled pairs {r['cosine_shuffled']:.4f})"),
        ("cos(Enc(B), Enc(B'))", f"{r['cosine_b_b']:.4f}  (1 = collapsed)"),
    ]
    if r["pred_cosine"] is not None:
        rows.append((f"cos(Pred_k={r['predictor_tokens']}, Enc(B))",
                     f"{r['pred_cosine']:.4f}  (shuffled pairs {r['pred_cosine_shuffled']:.4f})"))  # fmt: skip
    rows += [
        (
            "lstsq residual",
            f"{r['lstsq_residual']:.4g}  (relative {r['lstsq_residual_relative']:.4g})"
            + ("" if r["lstsq_well_posed"] else "  [N <= H: not meaningful]"),
        ),  # fmt: skip
        ("affine residual / spread", f"{r['lstsq_residual_centered']:.4f}  (sqrt(1 − R²))"),
        (
            "top singular values",
            " ".join(f"{s:.3g}" for s in sv[:5]) + (" …" if len(sv) > 5 else ""),
        ),
        ("time", f"{r['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(model_dir: str, data: str, out: str = "", **options) -> None:
    """Evaluates MODEL_DIR on DATA; prints a table and writes the JSON (--out). Options: the
    keyword arguments of evaluate(), e.g. --predictor_tokens 3 --limit 500 --batch_size 32."""
    try:
        inspect.signature(evaluate).bind(model_dir, data, **options)
    except TypeError as e:  # an unknown option
        sys.exit(f"pretrain.evaluate: error: {e}")
    try:
        r = evaluate(model_dir, data, **options)
    except (EvalError, InputError, FileNotFoundError, OSError) as e:
        sys.exit(f"pretrain.evaluate: error: {e}")
    out_path = (
        Path(out) if out else Path(model_dir) / f"eval_{Path(str(data).rstrip('/')).name}.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(r, indent=1) + "\n")
    print(format_table(r))
    for ex in r["examples"][:3]:
        print(f"  A: {ex['a']!r}\n  B: {ex['b']!r}\n  → {ex['generated']!r}")
    print(f"results: {out_path}")


def usage() -> str:
    """--help: the command line and every option of evaluate() with its default."""
    options = [f"    --{name} (default {param.default!r})"
               for name, param in inspect.signature(evaluate).parameters.items()
               if param.default is not inspect.Parameter.empty]  # fmt: skip
    return ("usage: python -m pretrain.evaluate MODEL_DIR DATA [--out OUT.json] [options]\n\n"
            + (main.__doc__ or "") + "\n\noptions:\n" + "\n".join(options))  # fmt: skip


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):  # fire exits 2 after showing help here
        print(usage())
        sys.exit(0)
    import fire

    fire.Fire(main)
