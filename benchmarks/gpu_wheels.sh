#!/usr/bin/env bash
# Prepare the wheels the GPU check's device call carries (docs/gpu.md): the packages the checked code imports
# that the device image lacks, as listed in benchmarks/gpu_check.py (CARRIED_WHEELS; a test keeps that list
# equal to what the code imports). Writes them to .whl/ at the repository root (ignored by git).
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
specs=$($py -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; print(' '.join(gpu_check.CARRIED_WHEELS.values()))")
rm -rf .whl
mkdir .whl
for spec in $specs; do
  # the image runs CPython 3.12 on x86-64; these are pure-Python wheels. antlr4-python3-runtime 4.9.3 exists
  # only as a source distribution: pip builds its (pure-Python) wheel here.
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec" 2>/dev/null \
    || $py -m pip wheel -q --no-deps -w .whl "$spec"
done
ls -l .whl
du -sh .whl
