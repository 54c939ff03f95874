#!/usr/bin/env bash
# Times training steps at two precisions, alternating A B A B ... in fresh runs of one config
# (the same data, seed and steps each time), and prints each run's time for steps 3..N from
# the log's elapsed_s (start-up and the first two steps left out) and the B/A ratio per round.
# Usage: bash scripts/train-step-ab.sh CONFIG [STEPS=12] [ROUNDS=2] [A=f32] [B=bf16]
#   PSIC (default target/release/psic, a build with the train feature) runs the commands.
# Run it on an otherwise idle machine: other work on the cores skews both columns.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: train-step-ab.sh CONFIG [STEPS] [ROUNDS] [A] [B]}
steps=${2:-12}
rounds=${3:-2}
a=${4:-f32}
b=${5:-bf16}
psic=${PSIC:-target/release/psic}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() { # precision -> seconds for steps 3..N
  grep -v '^precision *=' "$config" | sed "0,/^\[/s//precision = \"$1\"\n[/" > "$work/c.toml"
  rm -rf "$work/out"
  "$psic" train --quiet --config "$work/c.toml" --out "$work/out" --steps "$steps" >/dev/null
  python3 - "$work/out/log.jsonl" "$steps" <<'PY'
import json, sys
e = [json.loads(l)["elapsed_s"] for l in open(sys.argv[1]) if '"elapsed_s"' in l]
n = int(sys.argv[2])
print(f"{e[n - 1] - e[1]:.2f}")
PY
}
echo "round  $a (s, steps 3-$steps)  $b (s)  $b/$a"
for r in $(seq 1 "$rounds"); do
  ta=$(run "$a")
  tb=$(run "$b")
  python3 -c "print(f'$r  $ta  $tb  {$tb / $ta:.3f}')"
done
