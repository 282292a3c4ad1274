#!/usr/bin/env bash
# The MNIST experiments (Fig. 2, Fig. 3, Table 1, Appendix B, beyond the paper).
# Every sweep is resumable: rerun this script after an interruption and it continues.
#   bash results/run_mnist.sh                  # the paper's protocol: 5 seeds, 50k + 50k steps
#   SEEDS=2 ONLY=table1 bash results/run_mnist.sh          # one seed of one part
#   REDUCED=1 bash results/run_mnist.sh        # quick protocol: 2 seeds, 3k + 1k steps
# Parts (ONLY, space-separated): table1 linear sigmoid tanh fig3d appb global iterative.
# One-shot sweeps of FCNs retrain each seed's pruned copies together with the sparse engine
# (--engine auto), at the cost of their surviving weights.
# then: .venv/bin/python results/build_mnist.py      (results/mnist-fcn/, results/mnist-linear/)
#   or: .venv/bin/python results/build_mnist.py results/mnist-reduced.sqlite --out mnist-reduced
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
LAP=".venv/bin/lap"
ONLY="${ONLY:-table1 linear sigmoid tanh fig3d appb global iterative}"
if [ "${REDUCED:-0}" = 1 ]; then
  DB=${DB:-results/mnist-reduced.sqlite}
  COMMON="--dataset mnist --seeds ${SEEDS:-0,1} --train-steps 3000 --retrain-steps 1000 --db $DB --quiet"
else
  DB=${DB:-results/mnist-full.sqlite}
  COMMON="--dataset mnist --seeds ${SEEDS:-0,1,2,3,4} --train-steps 50000 --retrain-steps 50000 --db $DB --quiet"
fi
for part in $ONLY; do
  case $part in
    table1)
      $LAP sweep --model fcn --methods mp,rp,lfp,lbp,lap,lap-forward,lap-backward,lap-forward-seq,lap-backward-seq --levels 4-10 $COMMON ;;
    linear) $LAP sweep --model linear --methods mp,lap --levels 1-10 $COMMON ;;
    sigmoid) $LAP sweep --model fcn --activation sigmoid --methods mp,lap --levels 4-10 $COMMON ;;
    tanh) $LAP sweep --model fcn --activation tanh --methods mp,lap --levels 4-10 $COMMON ;;
    appb) $LAP sweep --model fcn --methods mp,lap --levels 1-3 $COMMON ;;
    # Fig. 3d's levels above Table 1's (50%, 25%, 12.6% kept) before retraining: prune and
    # evaluate only, so they cost seconds; appb retrains the same prunings for Appendix B.
    fig3d) $LAP sweep --model fcn --methods mp,lap --levels 1-3 $COMMON --retrain-steps 0 ;;
    # Beyond the paper, at the sparsest level of Table 1 (level 10, 0.12% kept): global budgets
    # and iterative pruning (five prune-retrain rounds, so 5x the retraining of one-shot rows).
    global) $LAP sweep --model fcn --methods lamp,lap,mp --levels 10 --scope global $COMMON ;;
    iterative) $LAP sweep --model fcn --methods lap,lap-forward-seq --levels 2,4,6,8,10 --mode iterative $COMMON ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
