#!/bin/bash
# The optimizer comparison, one bench folder per task: each task's LR grids are the 3 half-decade
# points around each optimizer's best LR on that task in ../full/ (a 4th for Celo2 on the
# autoencoder, where the shipped and published thetas peak one step apart), times each optimizer's
# default weight-decay grid (0, 0.01, 0.1, 1), 3 seeds. Resumable: rerun to finish; extra flags
# (e.g. --dry-run) pass through to every bench.
#
#   DATA=../shared/datasets PHOTOS_THETA=benchmarks/results/theta-photos/photos_theta.state \
#       bash benchmarks/results/compare/run.sh
#
# A run's key includes its theta's path: to resume these records, give the paths they were made with
# (published: /work/shared/reference/celo2_official_theta.state; photos: /work/runs/photos/theta.state,
# the same weights as ../theta-photos/photos_theta.state, sha c7b79412e0c6eb81).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/compare
DATA=${DATA:?set DATA to the folder holding MNIST and Fashion-MNIST}
PUBLISHED=${PUBLISHED_THETA:-/work/shared/reference/celo2_official_theta.state}
PHOTOS=${PHOTOS_THETA:-/work/runs/photos/theta.state}
CELO2=${CELO2:-celo2}
bench() {
  local task=$1 celo2_lrs=$2 adamw_lrs=$3 muon_lrs=$4; shift 4
  "$CELO2" bench --suite compare --tasks "$task" --optimizers celo2,adamw,muon \
    --theta shipped --theta "published=$PUBLISHED" --theta "photos=$PHOTOS" \
    --lr-grid "celo2=$celo2_lrs" --lr-grid "adamw=$adamw_lrs" --lr-grid "muon=$muon_lrs" \
    --data-dir "$DATA" --jobs 2 --out "$OUT/$task" "$@"
}
bench mlp         0.000316,0.001,0.00316       0.00316,0.01,0.0316 0.00316,0.01,0.0316 "$@"
bench autoencoder 0.000316,0.001,0.00316,0.01  0.00316,0.01,0.0316 0.00316,0.01,0.0316 "$@"
bench cnn         0.000316,0.001,0.00316       0.00316,0.01,0.0316 0.00316,0.01,0.0316 "$@"
bench vit         0.000316,0.001,0.00316       0.001,0.00316,0.01  0.00316,0.01,0.0316 "$@"
bench gpt         0.001,0.00316,0.01           0.001,0.00316,0.01  0.01,0.0316,0.1     "$@"
"${PYTHON:-python}" benchmarks/compare_table.py "$OUT"/*/ --out "$OUT"
