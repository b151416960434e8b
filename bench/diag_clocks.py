"""Whether a kernel trails its anchor because the GPU clocks down under it: the SM clock, power
and throttle reasons (nvidia-smi, sampled every 100 ms) while each case runs back to back for
a few seconds, with the case's TFLOP/s over the same loop. Cases: all P x P steps of a 64k
striped ring (Hq 32 / Hkv 8, D 128, bf16), the Gluon step merging and writing the state, and the
same steps as FA3 calls (FlashInfer; skipped with a line when absent). Two rounds, in turn.

Why: in one H200 call the merged Gluon steps ran at 0.938x FA3's steps at 16k tokens per rank,
against 0.985x on an H100, with FA3's own rate the same on both (614 / 618 TFLOP/s).

    python bench/diag_clocks.py [--P 4] [--seconds 4]
"""

import argparse
import statistics
import subprocess
import threading
import time

import torch

from anchors import step_attend
from ring_cases import StripedRing, causal_flops, random_qkv

from esp_kernels.prefill.gluon_step import ring_step_gluon

FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


class Sampler:
    """nvidia-smi in the background; each sample stamped with this host's clock on arrival."""

    def __init__(self, period_ms=100):
        self.samples = []  # (time, sm MHz, watts, deg C, reasons)
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits",
             "-lms", str(period_ms), "-i", str(torch.cuda.current_device())],
            stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.time(), float(parts[0]), float(parts[1]),
                                     float(parts[2]), parts[3]))
            except (ValueError, IndexError):
                continue

    def between(self, t0, t1):
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def stop(self):
        self.proc.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    L, Hq, Hkv, D = 65536, 32, 8, 128
    q, k, v = random_qkv(L, Hq, Hkv, D)
    flops = causal_flops(L, Hq, D)
    ring = StripedRing(q, k, v, args.P)
    scale = D ** -0.5

    def merged(qi, kj, vj, cu, n, o, lse, shift, acc):
        ring_step_gluon(qi, kj, vj, cu, cu, n, o, lse, True, shift, acc, scale)

    def written(qi, kj, vj, cu, n, o, lse, shift, acc):
        ring_step_gluon(qi, kj, vj, cu, cu, n, o, lse, True, shift, False, scale)

    cases = {"Gluon steps, state merged": lambda: ring.all_steps(merged),
             "Gluon steps, state written": lambda: ring.all_steps(written)}
    fa3 = step_attend("FA3", ring.qs[0], ring.ks[0], ring.vs[0])
    if fa3 is not None:
        cases["FA3 steps, no merge"] = lambda: ring.anchor_steps(fa3)
    for fn in cases.values():  # compile and warm up before any sample counts
        fn()
    torch.cuda.synchronize()
    sampler = Sampler()
    time.sleep(1.0)
    idle = sampler.between(0, time.time())
    if not idle:
        raise SystemExit("nvidia-smi gave no samples: nothing to report")
    print(f"idle: SM {statistics.median(s[1] for s in idle):.0f} MHz, "
          f"{statistics.median(s[2] for s in idle):.0f} W")
    try:
        for rnd in range(2):
            for name, fn in cases.items():
                t0 = time.time()
                n = 0
                while time.time() - t0 < args.seconds:
                    fn()
                    n += 1
                    if n % 4 == 0:  # keep the host at most a few iterations ahead
                        torch.cuda.synchronize()
                torch.cuda.synchronize()
                t1 = time.time()
                time.sleep(0.3)  # the last samples of the loop arrive
                s = sampler.between(t0 + 0.5, t1)  # past the ramp
                if not s:
                    print(f"P={args.P} round {rnd} {name}: no samples")
                    continue
                reasons = sorted({x[4] for x in s})
                print(f"P={args.P} round {rnd} {name:<27} {flops * n / (t1 - t0) / 1e12:6.1f} "
                      f"TFLOP/s  SM {statistics.median(x[1] for x in s):5.0f} MHz "
                      f"(min {min(x[1] for x in s):.0f})  "
                      f"{statistics.median(x[2] for x in s):4.0f} W  "
                      f"{max(x[3] for x in s):.0f} C  throttle reasons {reasons}", flush=True)
    finally:
        sampler.stop()


if __name__ == "__main__":
    main()
