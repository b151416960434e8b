"""One PNG per benchmark family from a results JSONL: our value next to the same-run anchor.

    python bench/plot.py bench/results/<run>/bench.jsonl     # writes <run>/<family>.png
"""

import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    families = collections.defaultdict(list)
    for r in rows:
        families[r["family"]].append(r)
    out_dir = os.path.dirname(os.path.abspath(path))
    for family, rs in families.items():
        by_unit = collections.defaultdict(list)
        for r in rs:
            by_unit[r["unit"]].append(r)
        fig, axes = plt.subplots(len(by_unit), 1, figsize=(11, 2.2 + 0.55 * len(rs)),
                                 squeeze=False)
        for ax, (unit, ur) in zip(axes[:, 0], by_unit.items()):
            labels = [f"{r['case']}\n{r['ours']} vs {r['anchor']}" for r in ur]
            y = range(len(ur))
            ax.barh([i + 0.2 for i in y], [r["ours_value"] for r in ur], height=0.4,
                    label="esp_kernels", color="#1f77b4")
            ax.barh([i - 0.2 for i in y], [r["anchor_value"] for r in ur], height=0.4,
                    label="anchor (same run)", color="#bbbbbb")
            for i, r in zip(y, ur):
                ax.text(r["ours_value"], i + 0.2, f" {r['ratio']:.2f}x", va="center", fontsize=7)
            ax.set_yticks(list(y))
            ax.set_yticklabels(labels, fontsize=6)
            ax.invert_yaxis()
            better = "higher" if ur[0].get("higher_is_better", True) else "lower"
            ax.set_xlabel(f"{unit} ({better} is better; ratio > 1 favours esp_kernels)")
            ax.legend(fontsize=7, loc="lower right")
        info = rs[0]
        fig.suptitle(f"{family} — {info['device']}, commit {info.get('commit', '?')}, "
                     f"{info.get('date', '')[:10]}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{family}.png"), dpi=110)
        plt.close(fig)
        print("wrote", os.path.join(out_dir, f"{family}.png"))


if __name__ == "__main__":
    main(sys.argv[1])
