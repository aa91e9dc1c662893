#!/usr/bin/env bash
# The whole test suite, from a clean clone on a fresh machine: install the tools, build the wheel, install it,
# and test the installed wheel (not the source tree). The README names this script; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q --disable-pip-version-check "maturin>=1.7,<2" \
    torch numpy tqdm safetensors "transformers>=4.45" tokenizers huggingface_hub hypothesis pytest pytest-benchmark \
    ruff import-linter pytest-cov "mypy>=1.13,<3"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt / clippy / test"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test -p zstream-core

echo "== ruff"
ruff check python tests benches

echo "== mypy (the package's type hints: pyproject.toml [tool.mypy])"
mypy

echo "== import layers (import-linter: pyproject.toml [tool.importlinter])"
(cd python && lint-imports --config ../pyproject.toml)

echo "== wheel"
rm -rf dist
maturin build --release -o dist
python3 -m pip install -q --disable-pip-version-check --force-reinstall --no-deps dist/zstream-*.whl

echo "== pytest (against the installed wheel)"
# Run from tests/ so that python/ (the source tree) is not importable: what is tested is what was installed.
cd tests
python3 -c "import zstream, zstream._core as c, sys; assert 'site-packages' in c.__file__, c.__file__; print('testing', c.__file__)"
python3 -m pytest -q -p no:cacheprovider . ../benches --benchmark-disable --cov=zstream --cov-config=../pyproject.toml --cov-report=json:coverage.json \
    --cov-report=term:skip-covered
python3 ../scripts/coverage_check.py coverage.json

echo "== CPU regression guard (ratios measured in one process against benches/results/cpu_ratios.json)"
# A benchmark, not a unit test: timing stays out of pytest. Ratios to plain torch work on the same CPU, 2x slack.
python3 ../benches/regression.py --check
