# Sourced by scripts/eval-candidate.sh and scripts/ship-reports.sh (not run): the arguments of
# every candidate and default-model evaluation, the training target (Lite0) and the
# evaluation-only probe (Lite1; reported, never used to choose).
TARGET_ARGS=(--target efficientnet-lite --weights ../shared/models/efficientnet-lite0.safetensors
  --probes efficientnet-lite:../shared/models/efficientnet-lite1.safetensors)
