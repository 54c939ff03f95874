#!/usr/bin/env python3
"""Means over windows of a psic training log (log.jsonl), and its validation lines.

    python3 scripts/run_summary.py runs/v7-stage1/log.jsonl [WINDOW]

Prints, per window of WINDOW steps (default 25): the periodic share of the shield's change,
the feature cosine, the shielded top-1 of the batch and the full - shielded PSNR gap; then
every validation record. Only the Python standard library is used.
"""
import json
import statistics
import sys


def main():
    path = sys.argv[1]
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    steps, vals = [], []
    for line in open(path):
        d = json.loads(line)
        if "val" in d:
            vals.append(d["val"])
        elif "psnr_shielded" in d and d.get("psnr_shielded") is not None:
            steps.append(d)
    print("| steps | periodic share | feature cosine | shielded top-1 (batch) | full - shielded PSNR |")
    print("| --- | --- | --- | --- | --- |")
    for a in range(0, len(steps), window):
        c = steps[a:a + window]
        mean = lambda k: statistics.mean(d[k] for d in c if d.get(k) is not None)
        gap = statistics.mean(d["psnr"] - d["psnr_shielded"] for d in c)
        per = mean("periodic") if any("periodic" in d for d in c) else float("nan")
        feat = mean("feature") if any("feature" in d for d in c) else float("nan")
        print(f"| {c[0]['step']}-{c[-1]['step']} | {per:.3f} | {feat:.3f} | "
              f"{100 * mean('shielded_top1'):.0f}% | {gap:.2f} dB |")
    for v in vals:
        print(f"validation step {v['step']}: bpp {v['bpp']:.3f}, PSNR full {v['psnr_full']:.2f} / "
              f"shielded {v['psnr_shielded']:.2f} dB, top-1 original {100 * v['top1_original']:.1f}%, "
              f"full {100 * v['top1_full']:.1f}%, shielded {100 * v['top1_shielded']:.1f}%")


if __name__ == "__main__":
    main()
