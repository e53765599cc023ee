#!/usr/bin/env bash
# One independent replicate of the whole pipeline at HEAD: other collect / meta_train / meta_test / search
# seeds (= R), the same tasks, in its own clone (default /tmp/metadqn-replicates/rR), tracking off, one
# OpenMP thread per process (two replicates can then share a 2-core machine without stalling each other).
# Usage: scripts/replicate.sh R [DIR]. Then: python scripts/replicate_table.py reports/metrics.json DIR/reports/metrics.json ...
# (A first-class `metadqn replicate` is issue #13's.)
set -euo pipefail
r=$1
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${2:-/tmp/metadqn-replicates/r$r}
rm -rf "$dir"
git clone -q "$root" "$dir"
cd "$dir"
"$root/.venv/bin/python" - "$r" <<'PY'
import sys

import yaml

r = int(sys.argv[1])
p = yaml.safe_load(open("params.yaml"))
for section in ("collect", "meta_train", "meta_test"):
    p[section]["seed"] = r
p["meta_test"]["search"]["seed"] = r
p["tracking"]["enabled"] = False
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PATH=$root/.venv/bin:$PATH DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PREFECT_HOME=$dir/.prefect
metadqn init-pool
start=$(date +%s)
dvc repro
echo "replicate $r: $(( $(date +%s) - start )) s, metrics in $dir/reports/metrics.json"
