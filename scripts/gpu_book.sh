#!/usr/bin/env bash
# Execute chapters with the gpu profile on an offline GPU machine, keeping whatever finishes.
#
#   scripts/gpu_book.sh [BUDGET_SECONDS] [NOTEBOOK ...]
#
# Run from the repository root on a machine that has Python 3 with torch,
# torchvision, transformers, tokenizers and matplotlib but no Jupyter and no
# `datasets`, and no network. Before, where a package index is reachable, put
# into .whl/ (`echo /.whl/ >> .git/info/exclude`) the wheels, without
# dependencies, of nbformat, nbclient, ipykernel and datasets and of whatever
# of their requirements the GPU machine lacks (pip download --no-deps
# --python-version of that machine), and send along .whl/ and, to save
# rebuilding them there, the feature/tokenizer cache (.cache/features,
# .cache/tokenizer-*); the detector itself is committed (checkpoints/world/),
# so features built there come from the same weights. Notebooks run in the
# order given (default: every chapter of _toc.yml); each one gets what is left
# of BUDGET_SECONDS (default 480) and is skipped when under a minute is left.
# After each notebook the executed copy, its results file and every
# results/bench_*.json are packed again into one archive, $OUT/gpu-run.tgz
# (default: _build/gpu-run/), so a time-out loses only the notebook it stopped
# and the device tool, which returns at most eight files, returns them all.
# Back on the authoring machine: `tar xzf gpu-run.tgz` in the repository root,
# then tidy the progress bars of the returned notebooks with
# `scripts/execute_notebooks.py --tidy-only NOTEBOOK ...`.
set -uo pipefail

budget=${1:-480}
shift || true
if [ $# -gt 0 ]; then
    notebooks=("$@")
else
    mapfile -t notebooks < <(python3 - <<'EOF'
import re
for line in open("_toc.yml"):
    m = re.search(r"file:\s*(notebooks/\S+)", line)
    if m:
        print(m.group(1) + ".ipynb")
EOF
)
fi
out=${OUT:-_build/gpu-run}
stage=_build/gpu-run-stage                 # what the archive holds, laid out as in the repository
rm -rf "$stage"
mkdir -p "$out" "$stage/notebooks" "$stage/results"

if python3 -c "import nbclient, ipykernel, datasets" 2>/dev/null; then
    export PYTHONPATH=$PWD                  # Jupyter is already there (e.g. trying this script out locally)
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_book: could not install the wheels in .whl/" >&2; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD
fi
export FUSIONLIB_PROFILE=${FUSIONLIB_PROFILE:-gpu} FUSIONLIB_CACHE=${FUSIONLIB_CACHE:-$PWD/.cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

start=$(date +%s)
status=0
for nb in "${notebooks[@]}"; do
    left=$(( budget - ($(date +%s) - start) ))
    if [ "$left" -lt 60 ]; then
        echo "gpu_book: SKIPPED $nb (${left}s of the budget left)"
        status=1
        continue
    fi
    t0=$(date +%s)
    timeout "$left" python3 scripts/execute_notebooks.py --timeout "$left" "$nb"
    rc=$?
    echo "gpu_book: $nb rc=$rc in $(( $(date +%s) - t0 ))s"
    [ "$rc" -eq 0 ] || status=1
    cp "$nb" "$stage/notebooks/"
    stem=$(basename "$nb" .ipynb)
    [ -f "results/$stem.json" ] && cp "results/$stem.json" "$stage/results/"
    cp results/bench_*.json "$stage/results/" 2>/dev/null || true
    tar czf "$out/gpu-run.tgz" -C "$stage" notebooks results
done
echo "gpu_book: done in $(( $(date +%s) - start ))s, status $status"
exit $status
