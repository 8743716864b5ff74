#!/usr/bin/env bash
# `make gpu-check STAGE=...` on a GPU machine: the machine's own Python and torch, no venv and
# no network; builds for the local GPU's architecture only; each stage finishes in < 8 min.
#   build-test  build, then the whole test suite (CUDA tests run for real)
#   sanitize    compute-sanitizer memcheck/racecheck/synccheck on a representative subset
#   bench       op, kernel (BGMV) and merge (record, 8B swap vs PEFT) benchmarks on the device
#   lease       everything a short lease allows in one call (< 9.5 min): the build; the CUDA
#               tests, the primitives and compute-sanitizer memcheck side by side; then the
#               8B model (eager and CUDA graphs), kernel, merge and op benchmarks on a quiet GPU
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

# A toolchain that links libstdc++ statically into the extension (seen: /opt/gcc on the H200
# image, 2026-12-04) gives a module whose iostreams crash (c10::str in an argument check):
# build with the system compiler when there is one.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi

build() {
  local begin=$SECONDS
  echo "compilers: CC=${CC:-} CXX=${CXX:-} ($(${CXX:-g++} --version | head -1))"
  timeout 420 "$PY" setup.py build_ext --inplace > "$RESULTS/${STAMP}_build.log" 2>&1 || {
    tail -40 "$RESULTS/${STAMP}_build.log"; echo "gpu-check: build failed" >&2; exit 1; }
  smoke || {
    echo "gpu-check: smoke test failed; rebuilding with a private static libstdc++"
    rm -rf build adaptfuse/_C*.so
    ADAPTFUSE_LDFLAGS="-static-libstdc++ -Wl,--exclude-libs,ALL" timeout 420 "$PY" setup.py build_ext --inplace \
      >> "$RESULTS/${STAMP}_build.log" 2>&1 && smoke; } || { echo "gpu-check: the built extension fails its smoke test" >&2; exit 1; }
  echo "build: $((SECONDS - begin)) s"
}

smoke() {
  "$PY" -c "import adaptfuse; assert adaptfuse.cuda_available(), 'CUDA build not usable'" || return 1
  # One op with a list argument and an argument check that formats a message (the crash above).
  "$PY" -c "
import torch
from adaptfuse import ops
s = torch.tensor([0, -1], dtype=torch.int32, device='cuda')
y = torch.zeros(2, 8, device='cuda')
ops.expand_(y, torch.ones(2, 4, device='cuda'), [torch.ones(1, 4, 8, device='cuda')], [0],
            torch.tensor([4], dtype=torch.int32, device='cuda'), ops.plan(s, 1))
assert y[0].eq(4).all() and y[1].eq(0).all(), y
print('smoke: expand_ on CUDA ok')"
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
  lease)
    begin=$SECONDS
    [ -n "${OUT:-}" ] && mkdir -p "$OUT"
    archive() {  # results so far, in one file ($OUT takes 8 files at most)
      [ -n "${OUT:-}" ] && tar -czf "$OUT/results.tgz" -C "$RESULTS" $(cd "$RESULTS" && ls | grep "$STAMP") 2>/dev/null
    }
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    build
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$RESULTS/${STAMP}_gpu.txt"
    # Correctness, side by side (none of it is timed).
    { cmake -S cmake -B cmake-build-gpu -DCMAKE_CUDA_ARCHITECTURES="${ARCH/./}" >/dev/null &&
      cmake --build cmake-build-gpu -j4 --target primitives_cuda_test >/dev/null &&
      timeout 60 ./cmake-build-gpu/primitives_cuda_test; } > "$RESULTS/${STAMP}_primitives.txt" 2>&1 &
    primitives=$!
    SUBSET=(tests/test_ops.py::test_expand_several_output_slices tests/test_bgmv.py::test_request_bits_do_not_depend_on_the_batch
            tests/test_sgmv.py::test_same_bits_twice tests/test_merge.py::test_strided_weight_and_record_on_host)
    if command -v compute-sanitizer >/dev/null; then
      timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -x -m cuda -p no:cacheprovider \
        "${SUBSET[@]}" > "$RESULTS/${STAMP}_memcheck.txt" 2>&1 &
      sanitizer=$!
    fi
    timeout "${TEST_SECONDS:-150}" "$PY" -m pytest -v -m "${TEST_MARK:-cuda}" -n 12 -p no:cacheprovider --durations=15 \
      --junitxml="$RESULTS/${STAMP}_tests.xml" > "$RESULTS/${STAMP}_tests.txt" 2>&1
    echo "cuda tests exit $?: $(tail -1 "$RESULTS/${STAMP}_tests.txt")"
    grep -E "(FAILED|ERROR) " "$RESULTS/${STAMP}_tests.txt" | grep -v "^\[gw" | head -40
    wait $primitives; echo "primitives exit $?: $(tail -2 "$RESULTS/${STAMP}_primitives.txt" | tr '\n' ' ')"
    if [ -n "${sanitizer:-}" ]; then
      wait $sanitizer; echo "memcheck exit $?: $(grep -E "ERROR SUMMARY|passed|failed" "$RESULTS/${STAMP}_memcheck.txt" | tail -2 | tr '\n' ' ')"
    fi
    archive; echo "correctness done at $((SECONDS - begin)) s"
    # Benchmarks, one at a time; each skipped when the lease is nearly spent.
    step() {
      local limit=$1; shift
      if [ $((SECONDS - begin + limit)) -gt "${LEASE_SECONDS:-540}" ]; then echo "skipped (lease): $*"; return; fi
      echo "== $*"; timeout "$limit" "$PY" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|forward_call|original_forward"
      archive; echo "at $((SECONDS - begin)) s"
    }
    step 140 benchmarks/bench_model.py --preset llama-3-8b --device cuda --repeats 5
    step 50 benchmarks/bench_kernels.py --device cuda --dtype bfloat16 --quick
    step 80 benchmarks/bench_merge.py --device cuda --dtype bfloat16 --part swap --preset 8b --repeats 5
    step 40 benchmarks/bench_ops.py --device cuda --dtype bfloat16 --repeats 30
    step 40 benchmarks/bench_serving.py --device cuda --repeats 5
    archive
    exit 0
    ;;
  *)
    echo "unknown STAGE '$STAGE' (build-test, sanitize, bench)" >&2; exit 2 ;;
esac
