#!/usr/bin/env bash
# `make gpu-check STAGE=...` on a GPU machine: the machine's own Python and torch, no venv and
# no network; builds for the local GPU's architecture only; each stage finishes in < 8 min.
#   build-test  build, then the whole test suite (CUDA tests run for real)
#   sanitize    compute-sanitizer memcheck/racecheck/synccheck on a representative subset
#   bench       op, kernel (BGMV) and merge (record, 8B swap vs PEFT) benchmarks on the device
# Results go to benchmarks/results/ (and to $OUT when the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-build-test}"
PY="${PYTHON:-python3}"
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')") || {
  echo "gpu-check: no usable GPU (torch.cuda.get_device_capability failed)" >&2; exit 2; }
GPU=$("$PY" -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
STAMP="$(date +%F)_${GPU}"
export TORCH_CUDA_ARCH_LIST="$ARCH"
echo "gpu-check stage=$STAGE gpu=$GPU arch=$ARCH python=$("$PY" --version 2>&1) torch=$("$PY" -c 'import torch; print(torch.__version__)')"

build() {
  local begin=$SECONDS
  timeout 420 "$PY" setup.py -q build_ext --inplace > "$RESULTS/${STAMP}_build.log" 2>&1 || {
    tail -40 "$RESULTS/${STAMP}_build.log"; echo "gpu-check: build failed" >&2; exit 1; }
  "$PY" -c "import adaptfuse; assert adaptfuse.cuda_available(), 'CUDA build not usable'"
  echo "build: $((SECONDS - begin)) s"
}

copy_out() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
}

case "$STAGE" in
  build-test)
    build
    # The device.cuh primitives on the hardware, with the checks their emulated twins pass.
    if command -v cmake >/dev/null; then
      { cmake -S cmake -B cmake-build-gpu -DCMAKE_CUDA_ARCHITECTURES="${ARCH/./}" >/dev/null &&
        cmake --build cmake-build-gpu -j8 --target primitives_cuda_test >/dev/null &&
        ./cmake-build-gpu/primitives_cuda_test; } 2>&1 | tee "$RESULTS/${STAMP}_primitives.txt"
      copy_out "$RESULTS/${STAMP}_primitives.txt"
    fi
    timeout 300 "$PY" scripts/run_pytest.py -q -m "" -x --durations=15 \
      --junitxml="$RESULTS/${STAMP}_tests.xml" 2>&1 | tee "$RESULTS/${STAMP}_tests.txt"
    status=${PIPESTATUS[0]}
    copy_out "$RESULTS/${STAMP}_tests.txt" "$RESULTS/${STAMP}_tests.xml" "$RESULTS/${STAMP}_build.log"
    exit "$status"
    ;;
  sanitize)
    build
    SUBSET=(tests/test_ops.py::test_expand_several_output_slices tests/test_ops.py::test_ops_are_deterministic
            tests/test_bgmv.py::test_request_bits_do_not_depend_on_the_batch
            tests/test_merge.py::test_strided_weight_and_record_on_host tests/test_op_contract.py::test_empty_batches_are_no_ops
            tests/test_merge_methods.py::test_record_larger_than_the_staging_is_redone
            tests/test_merge_methods.py::test_overflowing_full_delta_is_refused_and_w_restored
            tests/test_sgmv.py::test_each_path_in_every_emulator_mode tests/test_sgmv.py::test_same_bits_twice)
    log="$RESULTS/${STAMP}_sanitize.txt"
    : > "$log"
    if ! command -v compute-sanitizer >/dev/null; then
      echo "compute-sanitizer not found: stage skipped" | tee -a "$log"; copy_out "$log"; exit 0
    fi
    status=0
    for tool in memcheck racecheck synccheck; do
      echo "== $tool" | tee -a "$log"
      timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
        "$PY" -m pytest -q -x -k cuda "${SUBSET[@]}" >> "$log" 2>&1
      code=$?
      echo "$tool exit $code" | tee -a "$log"
      if grep -q "Device not supported" "$log"; then echo "sanitizer refused this device: skipped" | tee -a "$log"; break; fi
      [ "$code" -eq 0 ] || status=$code
    done
    copy_out "$log"
    exit "$status"
    ;;
  bench)
    build
    status=0
    for dtype in bfloat16 float16; do
      timeout 150 "$PY" benchmarks/bench_ops.py --device cuda --dtype "$dtype" --repeats 50 || status=1
    done
    # Record sizes at 4096 x 4096, then the swap across Llama-3-8B's shapes against PEFT.
    timeout 240 "$PY" benchmarks/bench_merge.py --device cuda --dtype bfloat16 --repeats 10 || status=1
    timeout 200 "$PY" benchmarks/bench_kernels.py --device cuda --dtype bfloat16 || status=1
    # Adapter load from disk into a slot and swap-in from the pinned host cache.
    timeout 90 "$PY" benchmarks/bench_serving.py --device cuda --repeats 5 || status=1
    copy_out "$RESULTS"/*"${GPU}"*.json "$RESULTS"/*"${GPU}"*.png
    exit "$status"
    ;;
  *)
    echo "unknown STAGE '$STAGE' (build-test, sanitize, bench)" >&2; exit 2 ;;
esac
