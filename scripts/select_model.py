#!/usr/bin/env python3
"""Apply the default model's selection rule to `psic eval` reports of candidates.

    python3 scripts/select_model.py [--max-top1 3] [--max-purified 15] REPORT_DIR...

Each REPORT_DIR is a `psic eval` folder (its report.json) of one candidate (a model at one
shield strength) on the selection split (`--split eval` of ../shared/data/imagenet-val256, with
the purifications). A candidate qualifies when the training target's top-1 on its shielded
decodes is at most --max-top1 percent and, after every purification, at most --max-purified
percent; among those, the highest shielded PSNR wins. Probe models (Lite1) are printed, never
used. Prints one line per candidate and the choice; exits with 1 when none qualifies. Only the
Python standard library is used.
"""
import argparse
import json
import os
import sys


def load(folder):
    with open(os.path.join(folder, "report.json")) as f:
        s = json.load(f)["summary"]
    top1 = s["top1"]
    if "shielded" not in top1:
        sys.exit(f"{folder}: the report has no shielded top-1 (run eval with --target)")
    purified = {k: v for k, v in top1.items() if k.startswith("shielded+")}
    if not purified:
        sys.exit(f"{folder}: the report has no purifications (run eval without --no-purify)")
    probes = {n: p.get("shielded") for n, p in (s.get("probe_top1") or {}).items()}
    return s["psnr_shielded"], 100 * top1["shielded"], {k: 100 * v for k, v in purified.items()}, probes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-top1", type=float, default=3.0)
    ap.add_argument("--max-purified", type=float, default=15.0)
    ap.add_argument("reports", nargs="+")
    a = ap.parse_args()
    best = None
    for folder in a.reports:
        psnr, top1, purified, probes = load(folder)
        worst = max(purified, key=purified.get)
        ok = top1 <= a.max_top1 and purified[worst] <= a.max_purified
        probe_text = ", ".join(f"{n} {100 * v:.1f}%" for n, v in probes.items() if v is not None)
        print(
            f"{folder}: shielded {psnr:.2f} dB, top-1 {top1:.1f}%, worst purification "
            f"{worst} {purified[worst]:.1f}%{' (' + probe_text + ', not used)' if probe_text else ''}"
            f" -> {'qualifies' if ok else 'out'}"
        )
        if ok and (best is None or psnr > best[0]):
            best = (psnr, folder)
    if best is None:
        print("no candidate qualifies")
        sys.exit(1)
    print(f"chosen: {best[1]} ({best[0]:.2f} dB)")


if __name__ == "__main__":
    main()
