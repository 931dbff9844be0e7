#!/bin/bash
# Extra runs at the cpu study's largest batch (64K tokens), from the study's shared warm start, with the
# study's protocol (32 steps, an evaluation every step, target 2.6487 = the study's auto target):
#
#   ablation  does the 5-step warmup that every method gets in experiments/cpu.toml, or GN's annealed
#             schedule, change the steps-to-target comparison?  -> docs/results/cpu/ablation_64k.md
#   tuning    tuning past the study's grids: the AdamW learning rate of Muon's and GN's non-matrix
#             parameters (embedding, head, norms; fixed in the study), Shampoo and SOAP above their grids,
#             GN's inner learning rate (5 warmup steps as in the study)  -> docs/results/cpu/tuning_64k.md
#
#   bash experiments/cpu_64k.sh ablation|tuning [STUDY_DIR] [DATA] [OUT] [JOBS]
#
# Defaults: runs/study-cpu, ../shared/data/gutenberg-fiction, runs/<mode>-64k, 2 runs at a time (one
# thread each). Each run takes about 1 min (baselines) to 4 min (GN) of one core.
set -euo pipefail
MODE=${1:-}
STUDY=${2:-runs/study-cpu}
DATA=${3:-../shared/data/gutenberg-fiction}
OUT=${4:-runs/$MODE-64k}
JOBS=${5:-2}
TARGET=${TARGET:-2.6487}
GN="--optimizer gn --gn-schedule cosine_with_global_schedule"
case "$MODE" in
  ablation) SETTINGS=$(cat <<LIST
gn_protocol|$GN --lr 0.02 --adam-lr 1e-3 --warmup-steps 5
gn_nowarmup|$GN --lr 0.02 --adam-lr 1e-3 --warmup-steps 0
gn_paper_lr0.02|--optimizer gn --gn-schedule constant_with_inner_cosine --lr 0.02 --adam-lr 1e-3 --warmup-steps 0
gn_paper_lr0.01|--optimizer gn --gn-schedule constant_with_inner_cosine --lr 0.01 --adam-lr 1e-3 --warmup-steps 0
muon_protocol|--optimizer muon --lr 0.12 --adam-lr 1e-2 --warmup-steps 5
muon_nowarmup|--optimizer muon --lr 0.12 --adam-lr 1e-2 --warmup-steps 0
muon_warmup2|--optimizer muon --lr 0.12 --adam-lr 1e-2 --warmup-steps 2
soap_nowarmup|--optimizer soap --lr 0.025 --warmup-steps 0
LIST
  ) ;;
  tuning) SETTINGS=$(cat <<LIST
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
gn_0.01_adam1e-2|$GN --lr 0.01 --adam-lr 0.01
gn_0.02_adam3e-3|$GN --lr 0.02 --adam-lr 0.003
gn_0.02_adam1e-2|$GN --lr 0.02 --adam-lr 0.01
gn_0.02_adam3e-2|$GN --lr 0.02 --adam-lr 0.03
gn_0.04_adam1e-3|$GN --lr 0.04 --adam-lr 0.001
gn_0.04_adam3e-3|$GN --lr 0.04 --adam-lr 0.003
gn_0.04_adam1e-2|$GN --lr 0.04 --adam-lr 0.01
LIST
  ) ;;
  *) echo "cpu_64k: error: the first argument must be 'ablation' or 'tuning', got '$MODE'" >&2; exit 2 ;;
esac
[ -f "$STUDY/warmup/checkpoint.pt" ] || { echo "cpu_64k: error: no warm start at $STUDY/warmup (run the study first)" >&2; exit 2; }
mkdir -p "$OUT"
BASE=(--data "$DATA" --preset tiny --tokenizer bytes --seq-len 64 --micro-batch-size 16 --eval-tokens 16384
      --seed 0 --ckpt-every 0 --steps 32 --batch-tokens 65536 --eval-every 1 --target-loss "$TARGET"
      --init-from "$STUDY/warmup" --device cpu --threads 1 --quiet --warmup-steps 5)
gnopt prepare --data "$DATA" --tokenizer bytes > /dev/null
while IFS='|' read -r name args; do
  # a later --warmup-steps in $args overrides BASE's
  # shellcheck disable=SC2086
  gnopt train "${BASE[@]}" $args --out "$OUT/$name" > "$OUT/$name.log" 2>&1 && echo "$name done" &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
done <<< "$SETTINGS"
wait
for d in "$OUT"/*/; do
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]+'summary.json')); print(sys.argv[1], 'steps to target', s['steps_to_target'], 'final val loss', round(s['final_val_loss'], 4))" "$d"
done
