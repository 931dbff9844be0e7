#!/bin/bash
# Extra tuning at the cpu study's largest batch (64K tokens), past the study's grids: the AdamW learning
# rate of Muon's and GN's non-matrix parameters (embedding, head, norms; fixed in experiments/cpu.toml),
# Shampoo and SOAP above their grids, GN's inner learning rate. Same protocol as the study (its warm start,
# 5 warmup steps, cosine to 10% / GN cosine_with_global_schedule, 32 steps, eval every step, target 2.6487).
# Results: docs/results/cpu/tuning_64k.md.
#
#   bash experiments/cpu_tuning_64k.sh [STUDY_DIR] [DATA] [OUT] [JOBS]
#
# Defaults: runs/study-cpu, ../shared/data/gutenberg-fiction, runs/tuning-64k, 2 runs at a time.
set -euo pipefail
STUDY=${1:-runs/study-cpu}
DATA=${2:-../shared/data/gutenberg-fiction}
OUT=${3:-runs/tuning-64k}
JOBS=${4:-2}
TARGET=${TARGET:-2.6487}
[ -f "$STUDY/warmup/checkpoint.pt" ] || { echo "cpu_tuning_64k: error: no warm start at $STUDY/warmup (run the study first)" >&2; exit 2; }
mkdir -p "$OUT"
BASE=(--data "$DATA" --preset tiny --tokenizer bytes --seq-len 64 --micro-batch-size 16 --eval-tokens 16384
      --seed 0 --ckpt-every 0 --steps 32 --batch-tokens 65536 --eval-every 1 --target-loss "$TARGET"
      --init-from "$STUDY/warmup" --device cpu --threads 1 --quiet --warmup-steps 5)
GN=(--gn-schedule cosine_with_global_schedule)
gnopt prepare --data "$DATA" --tokenizer bytes > /dev/null
# name | arguments
SETTINGS=$(cat <<'LIST'
muon_0.08_adam0.01|--optimizer muon --lr 0.08 --adam-lr 0.01
muon_0.08_adam0.02|--optimizer muon --lr 0.08 --adam-lr 0.02
muon_0.12_adam0.02|--optimizer muon --lr 0.12 --adam-lr 0.02
muon_0.12_adam0.04|--optimizer muon --lr 0.12 --adam-lr 0.04
muon_0.12_adam0.08|--optimizer muon --lr 0.12 --adam-lr 0.08
muon_0.12_adam0.16|--optimizer muon --lr 0.12 --adam-lr 0.16
muon_0.19_adam0.01|--optimizer muon --lr 0.19 --adam-lr 0.01
muon_0.19_adam0.02|--optimizer muon --lr 0.19 --adam-lr 0.02
muon_0.19_adam0.04|--optimizer muon --lr 0.19 --adam-lr 0.04
muon_0.19_adam0.08|--optimizer muon --lr 0.19 --adam-lr 0.08
muon_0.19_adam0.16|--optimizer muon --lr 0.19 --adam-lr 0.16
muon_0.3_adam0.04|--optimizer muon --lr 0.3 --adam-lr 0.04
muon_0.3_adam0.08|--optimizer muon --lr 0.3 --adam-lr 0.08
muon_0.47_adam0.08|--optimizer muon --lr 0.47 --adam-lr 0.08
shampoo_0.075|--optimizer shampoo --lr 0.075 --adam-lr 0.01
shampoo_0.19|--optimizer shampoo --lr 0.19 --adam-lr 0.01
shampoo_0.47|--optimizer shampoo --lr 0.47 --adam-lr 0.01
shampoo_0.47_adam0.02|--optimizer shampoo --lr 0.47 --adam-lr 0.02
shampoo_1.2|--optimizer shampoo --lr 1.2 --adam-lr 0.01
soap_0.04|--optimizer soap --lr 0.04
adamw_0.024|--optimizer adamw --lr 0.024
adamw_0.064|--optimizer adamw --lr 0.064
gn_0.01_adam1e-2|--optimizer gn --lr 0.01 --adam-lr 0.01 GN
gn_0.02_adam3e-3|--optimizer gn --lr 0.02 --adam-lr 0.003 GN
gn_0.02_adam1e-2|--optimizer gn --lr 0.02 --adam-lr 0.01 GN
gn_0.02_adam3e-2|--optimizer gn --lr 0.02 --adam-lr 0.03 GN
gn_0.04_adam1e-3|--optimizer gn --lr 0.04 --adam-lr 0.001 GN
gn_0.04_adam3e-3|--optimizer gn --lr 0.04 --adam-lr 0.003 GN
gn_0.04_adam1e-2|--optimizer gn --lr 0.04 --adam-lr 0.01 GN
LIST
)
while IFS='|' read -r name args; do
  extra=()
  if [[ $args == *" GN" ]]; then args=${args% GN}; extra=("${GN[@]}"); fi
  # shellcheck disable=SC2086
  gnopt train "${BASE[@]}" $args "${extra[@]}" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 && echo "$name done" &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
done <<< "$SETTINGS"
wait
for d in "$OUT"/*/; do
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]+'summary.json')); print(sys.argv[1], 'steps to target', s['steps_to_target'], 'final val loss', round(s['final_val_loss'], 4))" "$d"
done
