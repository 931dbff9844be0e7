#!/bin/bash
# GN's fast-path settings one at a time, from the `cpu` study's shared warm start (issue 9):
#   paper                  the paper's line search (5 step sizes on N fresh micro-batches) and warm start
#   grid_warm_scale        the paper's line search, the model-scaled warm start (--warm-scale)
#   model_ls_no_warm_scale the model line search (the library's default), the paper's warm start (default)
#   model_ls_warm_scale    both
# Modes:
#   drift   8K tokens (N = 8), 256 outer steps (the `cpu` study's 2.1M-token budget), the paper's schedule
#           (the same inner peak at every outer step, no global warmup or decay): the setting where the
#           paper's warm start drifted. "No drift" = final validation loss within 0.01 of the run's minimum.
#   64k     64K tokens (N = 64), 32 steps, the `cpu` study's protocol (5 warmup steps, cosine to 10%, target
#           2.6488 = the cpu-cost study's auto target).
#
#   bash experiments/cpu_cost_ablation.sh drift|64k [STUDY_DIR] [DATA] [OUT] [JOBS]   # -> a markdown table
#
# Defaults: runs/study-cpu-cost (its warmup/ is the `cpu` study's warm start), ../shared/data/gutenberg-fiction,
# runs/ablation-<mode>, 2 runs at a time (one thread each). A run takes 1-2 min of one core.
set -euo pipefail
MODE=${1:-}
STUDY=${2:-runs/study-cpu-cost}
DATA=${3:-../shared/data/gutenberg-fiction}
OUT=${4:-runs/ablation-$MODE}
JOBS=${5:-2}
SETTINGS=$(cat <<LIST
paper|--ls-kind grid --no-warm-scale
grid_warm_scale|--ls-kind grid --warm-scale
model_ls_no_warm_scale|--ls-kind model --no-warm-scale
model_ls_warm_scale|--ls-kind model --warm-scale
LIST
)
COMMON=(--data "$DATA" --preset tiny --tokenizer bytes --seq-len 64 --micro-batch-size 16 --eval-tokens 16384
        --seed 0 --ckpt-every 0 --init-from "$STUDY/warmup" --device cpu --threads 1 --quiet --optimizer gn
        --lr 0.02 --adam-lr 1e-3)
case "$MODE" in
  drift) BASE=("${COMMON[@]}" --steps 256 --batch-tokens 8192 --eval-every 2
               --gn-schedule constant_with_inner_cosine --warmup-steps 0) ;;
  64k) BASE=("${COMMON[@]}" --steps 32 --batch-tokens 65536 --eval-every 1 --target-loss 2.6488
             --gn-schedule cosine_with_global_schedule --warmup-steps 5) ;;
  *) echo "cpu_cost_ablation: error: the first argument must be 'drift' or '64k', got '$MODE'" >&2; exit 2 ;;
esac
[ -f "$STUDY/warmup/checkpoint.pt" ] || { echo "cpu_cost_ablation: error: no warm start at $STUDY/warmup (run the study first)" >&2; exit 2; }
mkdir -p "$OUT"
gnopt prepare --data "$DATA" --tokenizer bytes > /dev/null
while IFS='|' read -r name args; do
  # shellcheck disable=SC2086
  gnopt train "${BASE[@]}" $args --out "$OUT/$name" > "$OUT/$name.log" 2>&1 && echo "$name done" >&2 &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
done <<< "$SETTINGS"
wait
python3 - "$OUT" "$MODE" <<'PY'
import json, statistics, sys
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
target = 2.6488


def steps_to_target(ev):  # linear interpolation between the evaluations around the first crossing
    for prev, e in zip([None, *ev], ev):
        if e["val_loss"] <= target:
            if prev is None:
                return float(e["step"])
            f = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])
            return prev["step"] + f * (e["step"] - prev["step"])
    return None


print("| setting | steps to target (interp.) | min val loss (step) | final val loss | final − min | q_start > 0 "
      "| q_start max | median α | α < 0.25 | passes/step | wall s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name in ("paper", "grid_warm_scale", "model_ls_no_warm_scale", "model_ls_warm_scale"):
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r.get("type") == "eval"]
    st = [r for r in rows if "type" not in r]
    best = min(ev, key=lambda r: r["val_loss"])
    final = ev[-1]["val_loss"]
    q = [r["q_start"] for r in st if r.get("q_start") is not None]
    alphas = [r["alpha"] for r in st if r.get("alpha") is not None]
    s2t = steps_to_target(ev) if mode == "64k" else None
    summary = json.loads((out / name / "summary.json").read_text())
    print(f"| {name} | {'–' if s2t is None else f'{s2t:.2f}'} | {best['val_loss']:.4f} ({best['step']}) | "
          f"{final:.4f} | {final - best['val_loss']:+.4f} | "
          f"{sum(v > 0 for v in q) / len(q):.0%} | {max(q):.3f} | {statistics.median(alphas):.3f} | "
          f"{sum(a < 0.2499 for a in alphas) / len(alphas):.0%} | "
          f"{statistics.median(r['passes'] for r in st):.1f} | {summary.get('wall_seconds', float('nan')):.0f} |")
PY
