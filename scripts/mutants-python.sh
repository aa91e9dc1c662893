#!/usr/bin/env bash
# Mutation testing of the Python package with mutmut (docs/testing.md has the results and every survivor):
#   bash scripts/mutants-python.sh [MODULE_GLOB ...]     default: the engine, generation, quantization and models
# mutmut imports the mutated copy from mutants/src, so the package is staged as src/zstream (with the native module
# built here) under target/mutmut, beside a copy of tests/. Too slow for CI (hours on 2 cores): run it by hand.
# Results: target/mutmut/mutants/ (mutmut's own), and a per-module kill rate printed at the end
# (killed / (killed + survived); "no tests" and timeouts are counted apart).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=$ROOT/target/mutmut
python3 -m pip install -q --disable-pip-version-check "mutmut>=3.8,<4" pytest-timeout

globs=("$@")
[ ${#globs[@]} -gt 0 ] || globs=("src/zstream/streaming/*" "src/zstream/foundations/quant/*"
                                  "src/zstream/foundations/models/*")

# The native module, built once for the staged package.
so=$(ls python/zstream/_core*.so 2>/dev/null | head -1 || true)
if [ -z "$so" ]; then
    maturin build --release -o target/mutmut-wheel >/dev/null
    unzip -o -j target/mutmut-wheel/zstream-*.whl 'zstream/_core*.so' -d python/zstream/ >/dev/null
fi

rm -rf "$STAGE"
mkdir -p "$STAGE/src"
cp -r python/zstream "$STAGE/src/zstream"
cp -r tests "$STAGE/tests"
cp -r benches "$STAGE/benches"
only=$(printf '"%s", ' "${globs[@]}")
# MUTMUT_TESTS="tests/test_ring.py tests/test_engine.py" narrows the tests for a run on one module
default_tests="tests/test_ring.py tests/test_engine.py tests/test_generation.py tests/test_quant.py
    tests/test_quantized_models.py tests/test_pack.py tests/test_models.py tests/test_planning.py tests/test_kernels.py
    tests/test_batch_planner.py tests/test_bench_cli.py tests/test_streaming_units.py"
read -r -a tests <<< "$(echo ${MUTMUT_TESTS:-$default_tests})"
selection=$(printf '"%s", ' "${tests[@]}")
cat > "$STAGE/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["src/zstream"]
# the planner's tests replay the measured rows stored under benches/results
also_copy = ["benches"]
only_mutate = [${only%, }]
# the Triton kernel's body is compiled by Triton from its source: mutmut's trampolines cannot stand in it; the
# calibration is the batch planner's timing code (mutants of its loop counts only change how long it measures)
do_not_mutate = ["src/zstream/foundations/quant/kernels.py", "src/zstream/streaming/calibrate.py"]
# a mutant that hangs (a ring waiting for an event never recorded) fails its test in a minute instead of timing out
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "--timeout", "60"]
# the tests of these modules (the GPU tests skip here; the hygiene, concurrency, fault and corruption suites, which
# guard the store and the process rather than these modules' results, are left out to keep the run in hours)
pytest_add_cli_args_test_selection = [${selection%, }]
process_isolation = "forkserver"   # torch is not fork-safe once its threads run
timeout_multiplier = 2.0
timeout_constant = 5.0
mutate_only_covered_lines = true

[tool.pytest.ini_options]
testpaths = ["tests"]
markers = ["gpu: needs a CUDA device", "slow: longer tests"]
TOML
cd "$STAGE"
# MUTMUT_STAGE_ONLY=1 stops here: the stage can be carried to a machine with more cores and run there
# (`mutmut run` in target/mutmut with PYTHONPATH=mutants/src; docs/testing.md says how the results were taken)
[ -z "${MUTMUT_STAGE_ONLY:-}" ] || exit 0
# Tests that start a Python subprocess (the Triton interpreter, the demo) import the mutated copy too. The folder
# exists before Python starts, or the import system caches it as missing.
mkdir -p "$STAGE/mutants/src"
export PYTHONPATH=$STAGE/mutants/src
MUTMUT_MAX_CHILDREN=${MUTMUT_MAX_CHILDREN:-2}
mutmut run --max-children "$MUTMUT_MAX_CHILDREN" || true
python3 "$ROOT/scripts/mutants_summary.py" "$STAGE"
