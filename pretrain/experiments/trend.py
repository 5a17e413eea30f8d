"""A size trend from several `pretrain.experiments.nlrx` summaries: one arm against the baseline
arm of each (the same protocol at several model sizes), as a table and a plot.

    python -m pretrain.experiments.trend --arm l2_k3_mid --out docs/results/nlrx_size_trend.png \
        0.52M=docs/results/nlrx_size05_summary.json 1.11M=docs/results/nlrx_collapse_summary.json \
        2.31M=docs/results/nlrx_size23_summary.json

Each point is LABEL=SUMMARY (the label is the model size, as the x axis reads it). Prints one
markdown row per point: prefix match of the baseline and of the arm (mean ± std over seeds), their
paired difference and its one-tailed p (as nlrx computed them), and cos(Enc B, Enc B′) of the arm.
"""

from __future__ import annotations

import json
from pathlib import Path

METRIC = "prefix_match"


def load_points(points: tuple[str, ...], arm: str) -> list[dict]:
    """[{label, base, arm, diff, p, cos_bb}] from LABEL=SUMMARY strings; one line for a bad one."""
    rows = []
    for point in points:
        label, sep, path = str(point).partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"trend: {point!r} is not LABEL=SUMMARY_JSON")
        try:
            summary = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"trend: {path}: cannot read a summary ({e})") from None
        arms = summary.get("arms") if isinstance(summary, dict) else None
        if not isinstance(arms, dict):
            raise SystemExit(f"trend: {path}: not an nlrx summary (no arms)")
        if arm not in arms:
            raise SystemExit(f"trend: {path} has no arm {arm!r} (arms: {', '.join(arms)})")
        try:
            base, this = arms[summary["baseline"]]["metrics"], arms[arm]["metrics"]
            vs = this[METRIC]["vs_lm"]
        except KeyError as e:
            raise SystemExit(f"trend: {path}: arm {arm!r} has no paired {METRIC} ({e})") from None
        rows.append({"label": label, "base": base[METRIC], "arm": this[METRIC],
                     "diff": (vs["mean_diff"], vs["std_diff"]), "p": vs["p_one_tailed"],
                     "cos_bb": this.get("cosine_b_b", {}).get("mean"),
                     "base_label": arms[summary["baseline"]]["label"],
                     "arm_label": arms[arm]["label"]})  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [f"| size | {rows[0]['base_label']} prefix % | {rows[0]['arm_label']} prefix % | "
             "Δ prefix | p | cos(Enc B, Enc B′) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        p = "–" if r["p"] is None else f"{r['p']:.3g}"
        cos = "–" if r["cos_bb"] is None else f"{r['cos_bb']:.4f}"
        lines.append(f"| {r['label']} | {r['base']['mean']:.2f} ± {r['base']['std']:.2f} | "
                     f"{r['arm']['mean']:.2f} ± {r['arm']['std']:.2f} | "
                     f"{r['diff'][0]:+.2f} ± {r['diff'][1]:.2f} | {p} | {cos} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, name in (("base", rows[0]["base_label"]), ("arm", rows[0]["arm_label"])):
        left.errorbar(x, [r[key]["mean"] for r in rows], [r[key]["std"] for r in rows],
                      marker="o", capsize=4, label=name)  # fmt: skip
    left.set(title="NL-RX-SYNTH prefix match (mean ± std over seeds)", ylabel="%")
    left.legend(fontsize=8)
    right.errorbar(x, [r["diff"][0] for r in rows], [r["diff"][1] for r in rows], marker="o",
                   capsize=4, color="C1")  # fmt: skip
    right.axhline(0, color="gray", lw=1)
    right.set(title=f"{rows[0]['arm_label']} − {rows[0]['base_label']} (paired)",
              ylabel="Δ prefix match, points")  # fmt: skip
    for ax in (left, right):
        ax.set_xticks(list(x), [r["label"] for r in rows])
        ax.set_xlabel("parameters")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(*points: str, arm: str = "l2_k3_mid", out: str = "runs/size_trend.png") -> None:
    if not points:
        raise SystemExit("trend: give LABEL=SUMMARY_JSON points (see --help)")
    rows = load_points(points, arm)
    print(markdown(rows), end="")
    plot(rows, Path(out))
    print(f"plot: {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
