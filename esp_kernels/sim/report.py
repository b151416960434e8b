"""Tables, CSV/JSON files, PNG plots and a plain-text progress bar for the simulator."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

from .metrics import kv_occupancy, utilization

__all__ = ["Progress", "format_table", "write_rows", "plot_sweep", "plot_timeline", "TABLE_COLUMNS"]

TABLE_COLUMNS = (("workload", "{}"), ("policy", "{}"), ("rate", "{:.3g}"), ("attainment", "{:.3f}"),
                 ("throughput_rps", "{:.3g}"), ("output_tok_s", "{:.4g}"), ("ttft_p50", "{:.3g}"),
                 ("ttft_p99", "{:.3g}"), ("tpot_p50", "{:.3g}"), ("tpot_p99", "{:.3g}"),
                 ("per_token_p50", "{:.3g}"), ("input_token_p90", "{:.3g}"),
                 ("output_token_p90", "{:.3g}"), ("utilization_mean", "{:.2f}"), ("kv_peak_fraction", "{:.2f}"),
                 ("preemptions", "{}"), ("unfinished", "{}"))


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, every 10% otherwise)."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = -1

    def __call__(self, fraction: float):
        pct = int(100 * min(max(fraction, 0.0), 1.0))
        if pct == self.last or (not self.tty and pct // 10 == self.last // 10 and pct < 100):
            return
        self.last = pct
        bar = "#" * (pct * self.width // 100)
        end = "" if self.tty and pct < 100 else "\n"
        lead = "\r" if self.tty else ""
        self.stream.write(f"{lead}{self.label} [{bar:<{self.width}}] {pct:3d}%{end}")
        self.stream.flush()

    def done(self):
        if self.last < 100:
            self(1.0)


def format_table(rows, columns=TABLE_COLUMNS) -> str:
    """Fixed-width text table of the rows (dicts) over the given (key, format) columns."""
    def cell(row, key, fmt):
        v = row.get(key, "")
        if isinstance(v, float) and math.isnan(v):
            return "-"
        return fmt.format(v) if v != "" else ""
    body = [[cell(r, k, f) for k, f in columns] for r in rows]
    widths = [max([len(k)] + [len(b[i]) for b in body]) for i, (k, _) in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line([k for k, _ in columns]), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_rows(rows, out_dir: str, stem: str = "results") -> list[str]:
    """rows -> out_dir/stem.csv and stem.json; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    paths = [os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.json")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(paths[1], "w") as f:
        json.dump(rows, f, indent=1, default=float)
    return paths


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_sweep(rows, out_dir: str, workload: str) -> list[str]:
    """latency vs rate and attainment vs rate (one line per policy) -> PNG paths ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = [r for r in rows if r["workload"] == workload]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    paths = []
    specs = (("latency", (("per_token_p50", "per-token latency p50 (s)"), ("ttft_p90", "TTFT p90 (s)"),
                          ("tpot_p90", "TPOT p90 (s)"))),
             ("attainment", (("attainment", "SLO attainment"),)))
    for stem, panels in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for p in policies:
                pts = sorted((r["rate"], r[key]) for r in rows if r["policy"] == p)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(label)
            if key == "attainment":
                ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
                ax.set_ylim(-0.02, 1.02)
            elif any(r[key] > 0 for r in rows if not math.isnan(r[key])):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{workload}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{workload}_{stem}_vs_rate.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


_COLORS = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green"}


def plot_timeline(result, path: str, max_launches: int = 20000) -> str | None:
    """Instance timeline (which batch kind ran when on each instance) over KV occupancy; PNG path."""
    plt = _pyplot()
    if plt is None:
        return None
    n = result.num_instances
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 1.5 + 0.35 * n + 2.5), sharex=True,
                                  gridspec_kw={"height_ratios": [max(n, 2), 4]})
    spans = {}      # one broken_barh per (instance, kind): per-bar calls took minutes for 10^4 batches
    for start, end, insts, kind in result.launches[:max_launches]:
        for i in insts:
            spans.setdefault((i, kind), []).append((start, end - start))
    for (i, kind), xs in spans.items():
        ax.broken_barh(xs, (i - 0.4, 0.8), facecolors=_COLORS.get(kind, "grey"), linewidth=0)
    ax.set_yticks(range(n))
    ax.set_ylabel("instance")
    util = utilization(result)
    ax.set_title(f"{result.policy}: mean utilization {util.mean():.2f}"
                 + (f" (first {max_launches} batches)" if len(result.launches) > max_launches else ""))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, list(_COLORS), fontsize=7, loc="upper right")
    for i, (t, frac) in enumerate(kv_occupancy(result)):
        if t.size:
            ax2.step(t, frac, where="post", linewidth=0.8, label=str(i) if n <= 16 else None)
    ax2.set_ylabel("KV used / capacity")
    ax2.set_xlabel("time (s)")
    ax2.set_ylim(0, 1.05)
    if n <= 16:
        ax2.legend(fontsize=6, ncol=min(n, 8), loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
