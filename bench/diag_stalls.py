"""Where the prefill step's warps stall, instruction by instruction, against FA3 (ncu's PC
sampling), on the ring's step shape: 8k queries x 8k keys, causal (a striped ring's diagonal
step), Hq 32 / Hkv 8, D 128, bf16 — ours with the state written and merged, and one FlashInfer FA3
call. It answers what static reading of the SASS cannot: whether the warpgroup barriers Triton
puts before each mbarrier arrive (3 a KV block, where FA3's loop has none) or the merged
epilogue hold the warps.

    ncu --profile-from-start off --section SourceCounters --section WarpStateStats \
        --section SpeedOfLight -o stalls python3 bench/diag_stalls.py
    ncu -i stalls.ncu-rep --page source --print-source sass --csv > stalls.csv
    python3 bench/diag_stalls.py --summarize stalls.csv

The run launches each case once between cudaProfilerStart/Stop (after a warm-up outside it).
--summarize prints, per kernel, the stall samples by instruction class and the 30 instructions
with the most samples."""

import argparse
import csv
import re
import sys
from collections import Counter, defaultdict


def run():
    import torch

    from anchors import fa3_prefill
    from ring_cases import OneRequestStep

    from esp_kernels.prefill import gluon_step
    from esp_kernels.testing import cu_seqlens

    case = OneRequestStep()
    n, D, q, k, v, o, lse = case.n, case.D, case.q, case.k, case.v, case.o, case.lse
    cu = cu_seqlens([n], "cuda")
    cases = {f"ours acc={int(acc)}": (
        lambda acc=acc: gluon_step.ring_step_gluon(q, k, v, cu, cu, n, o, lse, True, 0, acc,
                                                   D ** -0.5)) for acc in (False, True)}
    fa3 = fa3_prefill(q, k, v, causal=True)
    if fa3 is not None:
        cases["FA3"] = fa3
    for fn in cases.values():  # compile and warm up outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        print("profiled", name, flush=True)
    torch.cuda.profiler.stop()


_CLASSES = [("HGMMA", r"^HGMMA"), ("WARPGROUP", r"^WARPGROUP"), ("BAR", r"^BAR"),
            ("SYNCS (mbarrier)", r"^SYNCS"), ("MUFU", r"^MUFU"), ("SHFL", r"^SHFL"),
            ("LDS/STS/LDSM", r"^(LDS|STS|LDSM|STSM)"), ("LDG/STG/LDGSTS", r"^(LDG|STG|LDGSTS)"),
            ("FP32", r"^(FFMA|FMUL|FADD|FMNMX|FSEL|FSETP|F2FP)"), ("branch", r"^(BRA|BSYNC|BSSY)")]


def _klass(op):
    for name, pat in _CLASSES:
        if re.match(pat, op):
            return name
    return "other"


def summarize(path):
    """ncu's source page (--csv) holds one table per kernel, each led by its own header row."""
    tables, header, name = [], None, "?"
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name" and len(row) > 1:  # ncu's title row of a kernel's table
                name = row[1]
                continue
            if len(row) == 1:  # a bare title line
                name = row[0]
                continue
            if any(c.startswith("Warp Stall Sampling") for c in row):
                header = row
                tables.append((name, header, []))
                continue
            if header is not None and len(row) == len(header):
                tables[-1][2].append(row)
    if not tables:
        print("no table with 'Warp Stall Sampling' columns in", path)
        return
    print("columns:", tables[0][1])
    for number, (name, header, rows) in enumerate(tables):
        col = {c: i for i, c in enumerate(header)}
        src = col.get("Source")
        allc = next(i for c, i in col.items() if c.startswith("Warp Stall Sampling (All"))
        # per-reason sample columns, where the CSV has them (names like stall_long_sb)
        reason_cols = [(c, i) for c, i in col.items()
                       if "stall" in c.lower() and not c.startswith("Warp Stall Sampling")]
        total = 0
        by_class, by_reason = Counter(), defaultdict(Counter)
        top = []
        for r in rows:
            try:
                s = float(r[allc] or 0)
            except ValueError:
                continue
            text = r[src].strip() if src is not None else "?"
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split(" ")[0]
            total += s
            by_class[_klass(op)] += s
            for c, i in reason_cols:
                try:
                    by_reason[_klass(op)][c] += float(r[i] or 0)
                except ValueError:
                    pass
            top.append((s, r[col.get("# Address", col.get("Address", 0))], text))
        print(f"\n== table {number} (in launch order): {name[:150]}\n"
              f"   {len(rows)} instructions, {total:.0f} stall samples")
        for k, s in by_class.most_common():
            reasons = ", ".join(f"{c} {v / max(s, 1):.0%}"
                                for c, v in by_reason[k].most_common(4) if v)
            print(f"   {k:<18} {s / max(total, 1):6.1%}  {reasons}")
        print("   top instructions (samples, address, SASS):")
        for s, addr, text in sorted(top, reverse=True)[:30]:
            print(f"   {s:8.0f}  {addr:>8}  {text[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", metavar="CSV", help="summarize ncu's --page source CSV")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        run()


if __name__ == "__main__":
    sys.exit(main())
