#!/usr/bin/env bash
# Fine-tuning or rewinding after lookahead pruning (issue 19): FCN on MNIST, Adam, batch 60,
# --schedule step (lr / 10 from 50% and again from 75% of training), T = 50k training steps.
# Retraining modes (Renda et al., 2020; see README "Retraining"): finetune and rewind-lr retrain
# t = --retrain-steps steps; rewind-weights to step k and lottery (k = 0) retrain T - k steps.
# Every sweep is resumable and all share one database and one dense model per seed (which keeps
# its weights at every step a part rewinds to: --dense-snapshots).
#   bash results/run_rewinding.sh                   # everything: grid, iterative, budget
#   SEEDS=2 ONLY=grid bash results/run_rewinding.sh # one seed of one part
#   T=400 DB=/tmp/dry.sqlite SEEDS=0 bash results/run_rewinding.sh   # a dry run, seconds
# Parts (ONLY, space-separated):
#   grid       one-shot, levels 4-10 (6.36% ... 0.12% kept), MP, LAP, LAP-forward-seq, 5 seeds,
#              t = T: finetune, rewind-lr, lottery and rewind-weights to k = 5% of T, all four
#              modes of a seed retrained as ONE sparse group (84 models) from one dense model
#   iterative  finetune vs rewind-lr, MP and LAP, 3 seeds, levels 2,4,6,8,10 (the chain of
#              run_mnist.sh's iterative part: five rounds down to level 10)
#   budget     levels 6 and 9 (1.63% and 0.23% kept), MP and LAP, 3 seeds, t in {5%, 20%, 50%,
#              100%} of T = {2.5k, 10k, 25k, 50k}: finetune, rewind-lr and rewind-weights to
#              k = T - t, one group per t (the t = T rows of finetune and rewind-lr are the
#              grid's: stored once)
# then: .venv/bin/python results/build_rewinding.py   (results/mnist-rewinding/)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
LAP="${LAP:-.venv/bin/lap}"
ONLY="${ONLY:-grid iterative budget}"
T="${T:-50000}"
DB="${DB:-results/mnist-rewinding.sqlite}"
K=$((T / 20))                                     # 2.5k of 50k: "late" weight rewinding
BUDGETS="$((T / 20)) $((T / 5)) $((T / 2)) $T"    # 2.5k 10k 25k 50k
SNAPSHOTS="$K,$((T - T / 5)),$((T - T / 2)),$((T - T / 20))"  # every k a part rewinds to
COMMON="--model fcn --dataset mnist --schedule step --train-steps $T --dense-snapshots $SNAPSHOTS --engine auto --db $DB --quiet"
for part in $ONLY; do
  case $part in
    grid)
      $LAP sweep $COMMON --seeds "${SEEDS:-0,1,2,3,4}" --methods mp,lap,lap-forward-seq --levels 4-10 \
        --retrain finetune,rewind-lr,lottery,rewind-weights --rewind-step $K --retrain-steps $T ;;
    iterative)
      $LAP sweep $COMMON --seeds "${SEEDS:-0,1,2}" --methods mp,lap --levels 2,4,6,8,10 --mode iterative \
        --retrain finetune,rewind-lr --retrain-steps $T ;;
    budget)
      for t in $BUDGETS; do
        $LAP sweep $COMMON --seeds "${SEEDS:-0,1,2}" --methods mp,lap --levels 6,9 \
          --retrain finetune,rewind-lr,rewind-weights --retrain-steps $t --rewind-step $((T - t))
      done ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
