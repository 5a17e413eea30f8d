"""Step-time overhead of LLM-JEPA over LM-only training, against the theoretical token ratio.

    python bench/jepa_overhead.py SHARDS_DIR [--steps 8] [--records_per_step 64] [--seq_len 512]

Same model, same records per step, one process, modes interleaved step by step:

    lm        LM-only rows (the baseline)
    jepa      single-pass LLM-JEPA, k=1: per record the LM document + [bos] B + [P1] (this repo)
    dropout   jepa with loss dropout α=0.75 (a step is LM-only with probability 0.75)
    paper     the paper's layout: per record an LM row, and a second row holding [bos] A [P1]
              and [bos] B side by side (block-diagonal), i.e. 2× the LM tokens

A step is forward + backward + AdamW over all rows of the step, in micro-batches of
--micro_batch_rows, through the engine's objective module (pretrain/objective.py) with
--lm_loss chunked (default: the LM head at labelled positions only) or full (all logits). "tokens" is the non-padding token count relative to lm; "time" the measured
step time relative to lm (median over steps).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_pipeline import packing  # noqa: E402
from data_pipeline.dataset import PackedDataset  # noqa: E402
from pretrain import model as model_lib  # noqa: E402
from pretrain.config import JepaConfig, ModelConfig  # noqa: E402
from pretrain.objective import Objective, add_label_index  # noqa: E402


def paper_view_layout(views, sp: packing.SpecialIds) -> packing.RecordLayout:
    """[bos] A [P1] and [bos] B as two isolated segments, positions restarting per segment."""
    a, b = [int(t) for t in views[0]], [int(t) for t in views[1]]
    seg_a = [sp.bos, *a, sp.predictors[0]]
    seg_b = [sp.bos, *b]
    n = len(seg_a) + len(seg_b)
    zeros = np.zeros(n, dtype=np.int32)
    return packing.RecordLayout(
        input_ids=np.asarray(seg_a + seg_b, dtype=np.int64),
        position_ids=np.asarray(list(range(len(seg_a))) + list(range(len(seg_b))), dtype=np.int64),
        segment=np.asarray([0] * len(seg_a) + [1] * len(seg_b), dtype=np.int32),
        attend_start=zeros, attend_end=zeros.copy(),
        labels=np.full(n, packing.IGNORE_INDEX, dtype=np.int64),
        pairs=[(len(seg_a) - 1, n - 1, len(seg_a) - 2)], doc_len=len(seg_a),
    )  # fmt: skip


def greedy_rows(layouts, cfg: packing.PackingConfig) -> list[dict]:
    rows, cur, used = [], [], 0
    for lay in layouts:
        if used + len(lay) > cfg.seq_len:
            rows.append(packing.assemble_row(cur, list(range(len(cur))), cfg))
            cur, used = [], 0
        cur.append(lay)
        used += len(lay)
    if cur:
        rows.append(packing.assemble_row(cur, list(range(len(cur))), cfg))
    return rows


def build_rows(records, cfg: packing.PackingConfig, mode: str) -> list[dict]:
    stats = packing.PackStats()
    if mode == "paper":
        lm = [packing.fit_record(v, cfg, False, stats) for v in records]
        return greedy_rows(lm, cfg) + greedy_rows(
            [paper_view_layout(v, cfg.specials) for v in records], cfg
        )
    return greedy_rows([packing.fit_record(v, cfg, mode == "jepa", stats) for v in records], cfg)


def run_step(objective: Objective, opt, rows, micro: int) -> None:
    opt.zero_grad(set_to_none=True)
    n_lm = sum(int((r["labels"] != packing.IGNORE_INDEX).sum()) for r in rows)
    n_pairs = sum(len(r["pred_index"]) for r in rows)
    for i in range(0, len(rows), micro):
        host = add_label_index(packing.collate_rows(rows[i : i + micro]))
        batch = {k: torch.from_numpy(v) for k, v in host.items()}
        out = objective(batch, with_jepa=n_pairs > 0)
        loss = out.lm_sum / max(n_lm, 1) + out.aux_sum / max(n_pairs, 1)
        loss.backward()
    opt.step()


def measure(
    shards: str,
    steps: int = 8,
    records_per_step: int = 64,
    seq_len: int = 512,
    micro_batch_rows: int = 8,
    hidden_size: int = 256,
    layers: int = 4,
    threads: int = 2,
    seed: int = 0,
    lm_loss: str = "chunked",
) -> dict[str, tuple[float, float]]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ds = PackedDataset(shards, seq_len=seq_len, shuffle=True, seed=seed)
    cfg = packing.PackingConfig(
        seq_len=seq_len, specials=ds.specials, predictor_tokens=1,
        lm_views=ds.sources[0].lm_views, lm_loss_views=ds.sources[0].lm_loss_views,
    )  # fmt: skip
    config = model_lib.build_model_config(
        "llama", "tiny", vocab_size=ds.vocab_size, max_position_embeddings=seq_len,
        overrides={"hidden_size": hidden_size, "num_hidden_layers": layers, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "intermediate_size": 4 * hidden_size},
    )  # fmt: skip
    model = model_lib.build_model(config)
    objective = Objective(model, JepaConfig(predictor_tokens=1), ModelConfig(lm_loss=lm_loss))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    order = ds.epoch_order(0)
    modes = ("lm", "jepa", "dropout", "paper")
    times: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    n_rows: dict[str, list[int]] = {m: [] for m in modes}
    rng = np.random.default_rng(seed)
    for step in range(steps + 2):  # 2 warmup steps
        sids = order[step * records_per_step : (step + 1) * records_per_step]
        records = [ds.record(int(s))[1] for s in sids]
        for mode in modes:
            layout = mode
            if mode == "dropout":
                layout = "lm" if rng.random() < 0.75 else "jepa"
            rows = build_rows(records, cfg, layout)
            t0 = time.perf_counter()
            run_step(objective, opt, rows, micro_batch_rows)
            if step >= 2:
                times[mode].append(time.perf_counter() - t0)
                tokens[mode].append(sum(int((r["segment_ids"] > 0).sum()) for r in rows))
                n_rows[mode].append(len(rows))
    base_t, base_tok = statistics.median(times["lm"]), sum(tokens["lm"])
    print(f"{'mode':<10}{'tokens vs lm':>14}{'rows vs lm':>12}{'time vs lm':>12}{'step s':>10}")
    result = {}
    for mode in modes:
        tok_ratio = sum(tokens[mode]) / base_tok
        t_ratio = statistics.median(times[mode]) / base_t
        result[mode] = (tok_ratio, t_ratio)
        rows_ratio = sum(n_rows[mode]) / sum(n_rows["lm"])
        print(
            f"{mode:<10}{tok_ratio:>14.3f}{rows_ratio:>12.3f}{t_ratio:>12.3f}{statistics.median(times[mode]):>10.3f}"
        )
    return result


def main(shards: str, **kwargs) -> None:
    measure(shards, **kwargs)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
