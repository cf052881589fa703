#!/usr/bin/env bash
# The GPU figures of `make bench` on a lent device machine, in one call (README, "Benchmarks").
#
# That machine's Python 3.12 has torch but not zarr and its compiled needs, so they travel as wheels:
#   here:  make device-kit    (wheels into .whl/, 1,000 CIFAR-10 test JPEGs into .device-data/; git ignores both)
#   there: run(command="bash tests/bench/device_bench.sh", carry=[".whl", ".device-data"], timeout_s=540), then give_back
# WHEELS: another wheel folder (a CPU dry run here: WHEELS=none PYTHON=<venv python>).
# SECTIONS picks the bench sections (default: gpu pipeline fusion, about 8 minutes at most); the log lands in $OUT/bench.log.
set -uo pipefail
out=${OUT:-/tmp/diffrep-device-bench}
python=${PYTHON:-python3}
mkdir -p "$out"
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/diffrep-site "$wheels"/*.whl \
    || { echo "device_bench: installing the carried wheels failed (make device-kit here, carry .whl)"; exit 1; }
  export PYTHONPATH=/tmp/diffrep-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .device-data/cifar10-jpg ] && export DIFFREP_DATA="$PWD/.device-data"  # ../shared does not travel
"$python" -c "import zarr, numcodecs, torch" \
  || { echo "device_bench: zarr or torch does not import: make device-kit here and carry .whl"; exit 1; }
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
fi
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$out/gpu.txt"
# one section at a time, each under its own limit, so that a slow one cannot take the others' figures with it
: > "$out/bench.log"
for section in ${SECTIONS:-gpu pipeline fusion}; do
  case $section in pipeline) limit=260 ;; gpu) limit=130 ;; *) limit=100 ;; esac
  timeout "$limit" "$python" -m tests.bench "$section" 2>&1 | tee -a "$out/bench.log"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "device_bench: section $section passed its ${limit} s limit" | tee -a "$out/bench.log"
done
