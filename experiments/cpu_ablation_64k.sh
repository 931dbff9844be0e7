#!/bin/bash
# Schedule ablation at the cpu study's largest batch (64K tokens): does the 5-step warmup that every method
# gets in experiments/cpu.toml, or GN's annealed schedule, change the steps-to-target comparison?
# Every run starts from the study's shared warm start and uses the best learning rate the study selected
# at 64K; the target is the study's auto target. Results: docs/results/cpu/ablation_64k.md.
#
#   bash experiments/cpu_ablation_64k.sh [STUDY_DIR] [DATA] [OUT]     # 8 runs, one thread each, in parallel
#
# Defaults: runs/study-cpu, ../shared/data/gutenberg-fiction, runs/ablation-64k. With 2 cores, run it
# while nothing else runs (it takes about 8 x 4 min of CPU).
set -euo pipefail
STUDY=${1:-runs/study-cpu}
DATA=${2:-../shared/data/gutenberg-fiction}
OUT=${3:-runs/ablation-64k}
TARGET=${TARGET:-2.6487}
[ -f "$STUDY/warmup/checkpoint.pt" ] || { echo "cpu_ablation_64k: error: no warm start at $STUDY/warmup (run the study first)" >&2; exit 2; }
mkdir -p "$OUT"
BASE=(--data "$DATA" --preset tiny --tokenizer bytes --seq-len 64 --micro-batch-size 16 --eval-tokens 16384
      --seed 0 --ckpt-every 0 --steps 32 --batch-tokens 65536 --eval-every 1 --target-loss "$TARGET"
      --init-from "$STUDY/warmup" --device cpu --threads 1 --quiet)
run() { local name=$1; shift; gnopt train "${BASE[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 && echo "$name done"; }
gnopt prepare --data "$DATA" --tokenizer bytes > /dev/null
run gn_protocol --optimizer gn --lr 0.02 --adam-lr 1e-3 --gn-schedule cosine_with_global_schedule --warmup-steps 5 &
run gn_nowarmup --optimizer gn --lr 0.02 --adam-lr 1e-3 --gn-schedule cosine_with_global_schedule --warmup-steps 0 &
run gn_paper_lr0.02 --optimizer gn --lr 0.02 --adam-lr 1e-3 --gn-schedule constant_with_inner_cosine --warmup-steps 0 &
run gn_paper_lr0.01 --optimizer gn --lr 0.01 --adam-lr 1e-3 --gn-schedule constant_with_inner_cosine --warmup-steps 0 &
run muon_protocol --optimizer muon --lr 0.12 --adam-lr 1e-2 --warmup-steps 5 &
run muon_nowarmup --optimizer muon --lr 0.12 --adam-lr 1e-2 --warmup-steps 0 &
run muon_warmup2 --optimizer muon --lr 0.12 --adam-lr 1e-2 --warmup-steps 2 &
run soap_nowarmup --optimizer soap --lr 0.025 --warmup-steps 0 &
wait
for d in "$OUT"/*/; do
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]+'summary.json')); print(sys.argv[1], 'steps to target', s['steps_to_target'], 'final val loss', round(s['final_val_loss'], 4))" "$d"
done
