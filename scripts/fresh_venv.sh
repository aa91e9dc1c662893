#!/usr/bin/env bash
# What a new user does, in clean virtual environments (no --system-site-packages, no test extras), run from the repo
# root (bash scripts/fresh_venv.sh):
#   (i)  the README's first command, `pip install . && zstream demo`: a fresh venv, `pip install .` (built from source by
#        maturin's PEP 517 backend), `zstream demo` and `zstream --version`;
#   (ii) the release wheel, as a user of PyPI gets it: a second fresh venv, the manylinux wheel from dist/ (built by
#        scripts/release.sh when dist/ has none), `import zstream, zstream._core` and `zstream demo`.
# Commands run from a temporary directory outside the repo, so that the source tree is never what gets imported.
# Each step is timed; a failed demo is reported and the rest still runs; the script exits non-zero if anything failed.
# Environment: PYTHON (default python3); ZSTREAM_FRESH_KEEP=1 keeps the temporary directory for a look afterwards;
# ZSTREAM_FRESH_INSTALLER=uv installs the wheel in (ii) with uv instead of pip (uv itself goes in a venv of its own, the
# tested venv stays as clean): faster, see docs/release.md; pip, what a user of PyPI runs, is the default.
set -euo pipefail
ROOT=$PWD
if ! grep -qs '^name = "zstream"' "$ROOT/pyproject.toml"; then
    echo "fresh_venv.sh: run it from the zstream repo root" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
ARCH=$(uname -m)
INSTALLER=${ZSTREAM_FRESH_INSTALLER:-pip}
case "$INSTALLER" in
    pip | uv) ;;
    *) echo "fresh_venv.sh: ZSTREAM_FRESH_INSTALLER must be pip or uv, not '$INSTALLER'" >&2; exit 2 ;;
esac
UV_REQ="uv>=0.13,<0.14"   # 0.13.9 tried

WORK=$(mktemp -d "${TMPDIR:-/tmp}/zstream-fresh.XXXXXX")
if [ "${ZSTREAM_FRESH_KEEP:-0}" = 1 ]; then
    echo "fresh_venv.sh: keeping $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
# A fresh cache: the first demo writes its checkpoint here, the second reuses it.
export ZSTREAM_CACHE=$WORK/cache
# Nothing from the caller's environment on the venvs' import path.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE VIRTUAL_ENV
export PYTHONNOUSERSITE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

failures=()
timings=()
T_START=$SECONDS

# step NAME CMD...: run CMD (in $WORK, outside the repo), print and keep its time; a failure is recorded, not fatal.
step() {
    local name=$1 t0 rc
    shift
    printf '\n== %s\n' "$name"
    t0=$(date +%s.%N)
    set +e
    (cd "$WORK" && "$@")
    rc=$?
    set -e
    local dt
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    timings+=("$(printf '%7ss  %s%s' "$dt" "$name" "$([ $rc -eq 0 ] || echo "  (FAILED, exit $rc)")")")
    printf -- '-- %s: %ss, exit %d\n' "$name" "$dt" "$rc"
    [ $rc -eq 0 ] || failures+=("$name (exit $rc)")
    return $rc
}

report() {
    printf '\n== fresh_venv.sh timings\n'
    printf '%s\n' "${timings[@]}"
    printf '%7ss  total\n' "$((SECONDS - T_START))"
    if [ ${#failures[@]} -gt 0 ]; then
        printf 'fresh_venv.sh: FAILED: %s\n' "${failures[@]}" >&2
        exit 1
    fi
    echo "fresh_venv.sh: OK"
}

# check_clean VENV: the venv is what a user gets: no test extras, and zstream imported from the venv's site-packages.
check_clean() {
    local py=$1/bin/python
    local extras
    extras=$("$py" -m pip list --format=freeze 2>/dev/null | grep -iE '^(pytest|hypothesis|pytest-benchmark|ruff|accelerate)==' || true)
    if [ -n "$extras" ]; then
        echo "test extras found in $1: $(echo "$extras" | tr '\n' ' ')" >&2
        return 1
    fi
    "$py" -c '
import sys, zstream, zstream._core as c
assert sys.prefix != sys.base_prefix, "not a venv"
assert c.__file__.startswith(sys.prefix), ("zstream._core from outside the venv", c.__file__)
print("zstream", zstream.__version__, "from", c.__file__)
'
    echo "$("$py" -m pip list --format=freeze 2>/dev/null | wc -l) packages in the venv, no test extras"
}

# ---- (i) from source: pip install . && zstream demo
V1=$WORK/venv-source
step "(i) python3 -m venv (source)" "$PYTHON" -m venv "$V1" || report
# In the repo root, as the README says (pip builds in-tree: cargo's target/ there is reused between runs).
step "(i) pip install . (maturin builds from source)" \
    bash -c 'cd "$1" && "$2" -m pip install --progress-bar off .' _ "$ROOT" "$V1/bin/python" || report
step "(i) venv is clean" check_clean "$V1" || report
step "(i) zstream demo (writes the demo checkpoint)" "$V1/bin/zstream" demo || true
step "(i) zstream --version" "$V1/bin/zstream" --version || true

# ---- (ii) the release wheel, as installed from PyPI
# Only release.sh's manylinux2014 wheel counts: scripts/test.sh leaves a plain `maturin build` wheel in dist/ too, tagged
# for this machine's glibc, which is not what PyPI users get. A release wheel already in dist/ is used as it is.
release_wheels() {
    shopt -s nullglob
    wheels=("$ROOT"/dist/zstream-*-cp39-abi3-manylinux2014_"$ARCH".manylinux_2_17_"$ARCH".whl)
    shopt -u nullglob
}
release_wheels
if [ ${#wheels[@]} -eq 0 ]; then
    step "(ii) no release wheel in dist/: bash scripts/release.sh" bash "$ROOT/scripts/release.sh" || report
    release_wheels
fi
[ ${#wheels[@]} -eq 1 ] || { failures+=("(ii) expected one release wheel in dist/, found ${#wheels[@]}"); report; }
echo "wheel: ${wheels[0]}"
V2=$WORK/venv-wheel
step "(ii) python3 -m venv (wheel)" "$PYTHON" -m venv "$V2" || report
if [ "$INSTALLER" = uv ]; then
    step "(ii) uv, in a venv of its own" \
        bash -c '"$1" -m venv "$2" && "$2/bin/python" -m pip install -q "$3"' _ "$PYTHON" "$WORK/uv" "$UV_REQ" || report
    step "(ii) uv pip install $(basename "${wheels[0]}")" \
        "$WORK/uv/bin/uv" pip install --python "$V2/bin/python" "${wheels[0]}" || report
else
    step "(ii) pip install $(basename "${wheels[0]}")" \
        "$V2/bin/python" -m pip install --progress-bar off "${wheels[0]}" || report
fi
step "(ii) venv is clean" check_clean "$V2" || true
step "(ii) import zstream, zstream._core (outside the repo)" "$V2/bin/python" -c "import zstream, zstream._core" || true
step "(ii) zstream demo (reuses the checkpoint)" "$V2/bin/zstream" demo || true

report
