#!/usr/bin/env bash
# The MNIST experiments of issue 4 (Fig. 2, Fig. 3, Table 1, Appendix B) at a reduced protocol.
# Every sweep is resumable: rerun this script after an interruption and it continues.
#   bash results/run_mnist.sh                 # reduced protocol (what results/ holds)
#   FULL=1 bash results/run_mnist.sh          # the paper's: 5 seeds, 50k + 50k steps
# then: .venv/bin/python results/build_mnist.py results/mnist.sqlite
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
LAP=".venv/bin/lap"
DB=results/mnist.sqlite
if [ "${FULL:-0}" = 1 ]; then
  DB=results/mnist-full.sqlite
  COMMON="--dataset mnist --seeds 0,1,2,3,4 --train-steps 50000 --retrain-steps 50000 --db $DB --quiet"
else
  COMMON="--dataset mnist --seeds 0,1 --train-steps 3000 --retrain-steps 1000 --db $DB --quiet"
fi
$LAP sweep --model fcn --methods mp,rp,lfp,lbp,lap,lap-forward,lap-backward,lap-forward-seq,lap-backward-seq --levels 4-10 $COMMON
$LAP sweep --model linear --methods mp,lap --levels 1-10 $COMMON
$LAP sweep --model fcn --activation sigmoid --methods mp,lap --levels 4-10 $COMMON
$LAP sweep --model fcn --activation tanh --methods mp,lap --levels 4-10 $COMMON
$LAP sweep --model fcn --methods mp,lap --levels 1-3 $COMMON
# Beyond the paper, at the sparsest level of Table 1 (level 10, 0.12% kept): global budgets and
# iterative pruning (five prune-retrain rounds, so 5x the retraining of the one-shot rows).
$LAP sweep --model fcn --methods lamp,lap,mp --levels 10 --scope global $COMMON
$LAP sweep --model fcn --methods lap,lap-forward-seq --levels 2,4,6,8,10 --mode iterative $COMMON
