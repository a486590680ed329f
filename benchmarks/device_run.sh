#!/usr/bin/env bash
# The device session (see benchmarks/device_cargo.sh for how its parts travel): check and
# unpack the parts, install the wheels beside the machine's own packages, convert the default
# model, then run benchmarks/device_run.py with what is left of the budget. Results: $OUT.
#
#   bash benchmarks/device_run.sh              # on the device machine, in the repository root
#   bash benchmarks/device_run.sh --dry-run    # here: checks the parts if there are any (and
#                                              # that the wheels install for Python 3.12), then
#                                              # device_run.py --dry-run on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
WORK=${WORK:-/tmp/ndb-device}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"

if [ -d .cargo ]; then
    sums=$(ls .cargo/p*/SHA256SUMS | tail -1)
    (cd .cargo && sha256sum --quiet -c "${sums#.cargo/}") || {
        echo "device_run: a part is missing or damaged; send the parts again" >&2; exit 3; }
    cat $(ls -d .cargo/p* | sort -V | sed 's|$|/part|') | tar -C "$WORK" -xf -
fi

if [ "${1:-}" = "--dry-run" ]; then
    if [ -d "$WORK/wheels" ]; then  # that the wheels resolve for the device's Python
        rm -rf "$WORK/site-check"
        python3 -m pip install -q --no-index --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform any --target "$WORK/site-check" \
            "$WORK"/wheels/*.whl
        echo "device_run: the parts unpack and their wheels install for Python 3.12" >&2
    fi
    PY=${PYTHON:-.venv/bin/python}
    exec "$PY" benchmarks/device_run.py --dry-run --out "$OUT" --work "$WORK/dry" \
        ${GENERAL:+--general "$GENERAL"}
fi

[ -d "$WORK/wheels" ] || { echo "device_run: no parts unpacked (.cargo)" >&2; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WORK"/wheels/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target "$WORK/site" .
export PYTHONPATH="$WORK/site:$WORK" NDB_HOME="$WORK/home" PYTHONUNBUFFERED=1
[ -f "$WORK/geo.json" ] || gunzip -k "$WORK/geo.json.gz"
[ -f "$WORK/geo_groups.json" ] || gunzip -k "$WORK/geo_groups.json.gz"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# the GGUF, converted once into NDB_HOME; run elsewhere than here, where ./ndb (the sources,
# without their ndb.cli and ndb.indexes) would shadow the installed package
(cd "$WORK" && python3 -c "import ndb; ndb.load_model()")
LEFT=$((BUDGET_S - ($(date +%s) - START)))
python3 benchmarks/device_run.py --out "$OUT" --work "$WORK/run" --facts "$WORK/geo.json" \
    --group-facts "$WORK/geo_groups.json" --general "$WORK/general" --budget-s "$LEFT" \
    --device cuda "$@" 2>&1 | tee "$OUT/device_run.log"
