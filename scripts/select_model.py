#!/usr/bin/env python3
"""Apply the default model's selection rule to `psic eval` reports of candidates.

    python3 scripts/select_model.py [--max-top1 3] [--max-purified 15] [--size-tolerance 5]
        CANDIDATE...

Each CANDIDATE is one model at one shield strength, given as
- a `psic eval` folder (its report.json) on the selection split (`--split eval` of
  ../shared/data/imagenet-val256, with the purifications);
- `SPLIT_DIR:PHOTOS_X2_DIR`, that folder and the candidate's report on the 60 first held-out
  photos of ../shared/data/photos enlarged 2x (`--split eval -n 60 --scale 2`), the full-size
  selection set; or
- a folder written by scripts/eval-candidate.sh (its `split` and `photos-x2` reports).

A candidate qualifies when the training target's top-1 on its shielded decodes of the split is
at most --max-top1 percent and, after every purification, at most --max-purified percent. When
every qualifying candidate has a full-size report (the rule since session 12), those whose
Lite0 agreement on the enlarged photos is within --size-tolerance points of the lowest stay in
(5 points: 3 of 60 photos), and among them the highest shielded PSNR on the split wins; without
full-size reports (the rule of sessions 10-11), the highest shielded PSNR among the qualifying
wins. Probe models (Lite1) and the full decode's PSNR and top-1 are printed, never used. Prints one line per candidate and the
choice; exits with 1 when none qualifies. Only the Python standard library is used.
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
    full = (s.get("psnr_full"), top1.get("full"))
    return s["psnr_shielded"], 100 * top1["shielded"], {k: 100 * v for k, v in purified.items()}, probes, full


def full_size_agreement(folder):
    """Lite0 agreement (percent) of the shielded decodes with the originals' reading."""
    with open(os.path.join(folder, "report.json")) as f:
        return 100 * json.load(f)["summary"]["top1"]["shielded"]


def candidate_paths(arg):
    """(split report folder, full-size report folder or None) of one CANDIDATE argument."""
    if os.path.isfile(os.path.join(arg, "split", "report.json")):
        x2 = os.path.join(arg, "photos-x2")
        return os.path.join(arg, "split"), x2 if os.path.isfile(os.path.join(x2, "report.json")) else None
    if ":" in arg:
        split, x2 = arg.split(":", 1)
        return split, x2
    return arg, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-top1", type=float, default=3.0)
    ap.add_argument("--max-purified", type=float, default=15.0)
    ap.add_argument("--size-tolerance", type=float, default=5.0)
    ap.add_argument("candidates", nargs="+")
    a = ap.parse_args()
    qualified = []
    for arg in a.candidates:
        folder, x2 = candidate_paths(arg)
        psnr, top1, purified, probes, (full_psnr, full_top1) = load(folder)
        worst = max(purified, key=purified.get)
        ok = top1 <= a.max_top1 and purified[worst] <= a.max_purified
        size = full_size_agreement(x2) if x2 else None
        probe_text = ", ".join(f"{n} {100 * v:.1f}%" for n, v in probes.items() if v is not None)
        print(
            f"{arg}: shielded {psnr:.2f} dB, top-1 {top1:.1f}%, worst purification "
            f"{worst} {purified[worst]:.1f}%"
            f"{'' if size is None else f', photos x2 agreement {size:.1f}%'}"
            f"{' (' + probe_text + ', not used)' if probe_text else ''}"
            f"{'' if full_top1 is None else f'; full decode {full_psnr:.2f} dB, top-1 {100 * full_top1:.1f}% (not used)'}"
            f" -> {'qualifies' if ok else 'out'}"
        )
        if ok:
            qualified.append((psnr, size, arg))
    if not qualified:
        print("no candidate qualifies")
        sys.exit(1)
    if all(size is not None for _, size, _ in qualified):
        lowest = min(size for _, size, _ in qualified)
        qualified = [q for q in qualified if q[1] <= lowest + a.size_tolerance]
        print(f"full-size rule: photos x2 agreement within {a.size_tolerance:g} points of {lowest:.1f}%")
    best = max(qualified, key=lambda q: q[0])
    print(f"chosen: {best[2]} ({best[0]:.2f} dB)")


if __name__ == "__main__":
    main()
