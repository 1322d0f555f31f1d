#!/usr/bin/env bash
# The GPU check (issue 18), ready for the first machine with a CUDA GPU; under 5 minutes there.
#   experiments/gpu_check.sh [OUT_DIR]      (PYTHON=... to use another interpreter than .venv's)
# 1. the tests that compare the vectorized engine with the per-user loop, and the bf16
#    scoring check, with every tensor on the GPU (FEDREC_TEST_DEVICE=cuda);
# 2. bench_throughput.py --device cuda at the ML-1M shape: cohort 500, then a cohort of
#    5,000 (nearly every private ML-1M user, to fill the GPU); each prints users/s and the peak GPU memory
#    per worker. Goal (issue 18): >= 50,000 users/s on one H100/H200-class GPU.
# Without CUDA it says so and exits with status 2: nothing was checked.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
OUT="${1:-results/gpu-check}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not installed')) sees no CUDA device; nothing checked" >&2
    exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FEDREC_CACHE_DIR="${FEDREC_CACHE_DIR:-$PWD/.fedrec-cache}"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
echo "== 1. vectorized engine = per-user loop, and bf16 scoring, on cuda"
FEDREC_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_vectorized.py \
    -k "equals_the_per_user_loop or own_b_like_the_loop or grouping_does_not_matter or bfloat16 or never_exceeds_the_bound" \
    2>&1 | tee "$OUT/tests.log"
echo "== 2. throughput at the ML-1M shape on cuda (cohort 500, then 5,000)"
for cohort in 500 5000; do
    "$PY" experiments/bench_throughput.py --device cuda --only cohort_vectorized cohort_vectorized_bf16 \
        --cohort "$cohort" --json "$OUT/throughput-cohort$cohort.json" 2>&1 | tee "$OUT/throughput-cohort$cohort.log"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("throughput-cohort*.json")):
    r = json.loads(f.read_text())
    rates = ", ".join(f"{k} {v:,.0f} users/s" for k, v in r["users_per_s"].items() if k != "compute_bound")
    print(f"cohort {r['cohort']:,}: {rates}; peak GPU memory per worker {r.get('peak_gpu_mb') or 0:,.0f} MB")
PY
