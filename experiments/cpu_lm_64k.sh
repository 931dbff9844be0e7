#!/bin/bash
# Tuning check at the cpu-lm study's largest batch (64K tokens): would the baselines reach the study's target
# sooner with more tuning? AdamW's best lr there is the bottom of its grid (1e-3): 4e-4 lies past it, 1.6e-3
# between it and the next point; Muon (best 0.025, inside its grid): the points halfway to its neighbours,
# and the AdamW lr of its non-matrix parameters (fixed at 2.5e-3 in the study). SOAP's best is inside its
# grid. Same protocol as the study: its shared warm start, 12 steps,
# an evaluation every step, 3 warmup steps, data seed 0, target = the study's auto target.
#
#   bash experiments/cpu_lm_64k.sh [STUDY_DIR] [DATA] [OUT] [JOBS]     -> docs/results/cpu-lm/tuning_64k.md
#
# Defaults: runs/study-cpu-lm, ../shared/data/gutenberg-fiction, runs/tuning-cpu-lm-64k, 2 runs at a time
# (one thread each). Each run takes about 2 minutes of one core.
set -euo pipefail
STUDY=${1:-runs/study-cpu-lm}
DATA=${2:-../shared/data/gutenberg-fiction}
OUT=${3:-runs/tuning-cpu-lm-64k}
JOBS=${4:-2}
TARGET=${TARGET:-$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['target_loss'])" "$STUDY/study.json")}
SETTINGS=$(cat <<LIST
adamw_4e-4|--optimizer adamw --lr 4e-4
adamw_1.6e-3|--optimizer adamw --lr 1.6e-3
muon_0.016|--optimizer muon --lr 0.016 --adam-lr 2.5e-3
muon_0.04|--optimizer muon --lr 0.04 --adam-lr 2.5e-3
muon_0.025_adam1e-3|--optimizer muon --lr 0.025 --adam-lr 1e-3
muon_0.025_adam6e-3|--optimizer muon --lr 0.025 --adam-lr 6e-3
LIST
)
[ -f "$STUDY/warmup/checkpoint.pt" ] || { echo "cpu_lm_64k: error: no warm start at $STUDY/warmup (run the study first)" >&2; exit 2; }
mkdir -p "$OUT"
BASE=(--data "$DATA" --preset cpu-small --tokenizer bpe --vocab-size 2048 --seq-len 128 --micro-batch-size 16
      --eval-tokens 16384 --seed 0 --ckpt-every 0 --steps 12 --batch-tokens 65536 --eval-every 1
      --warmup-steps 3 --target-loss "$TARGET" --init-from "$STUDY/warmup" --device cpu --threads 1 --quiet)
while IFS='|' read -r name args; do
  # shellcheck disable=SC2086
  gnopt train "${BASE[@]}" $args --out "$OUT/$name" > "$OUT/$name.log" 2>&1 && echo "$name done" &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
done <<< "$SETTINGS"
wait
echo "| run | steps to target | final val loss |"
echo "|---|---|---|"
for d in "$OUT"/*/; do
  python3 - "$d" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "summary.json"))
print(f"| {sys.argv[1].rstrip('/').split('/')[-1]} | {s['steps_to_target']} | {s['final_val_loss']:.4f} |")
PY
done
