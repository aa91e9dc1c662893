#!/usr/bin/env bash
# Build the release artifacts into dist/ and check them (docs/release.md):
#   - one abi3 wheel (CPython >= 3.9) for manylinux2014 (glibc >= 2.17), linked with zig so that it does not depend on
#     this machine's glibc;
#   - the sdist.
# Checks: the wheel's tag (WHEEL file) and what auditwheel finds in it; twine check --strict on both files; the long
# description is the README and renders; the sdist holds every tracked source file that the build needs; and the
# sdist builds a working wheel from scratch in a fresh venv (pip wheel, as pip does for a user with no matching wheel).
# Exits non-zero on the first failure. Works from a clean clone: bash scripts/release.sh
# Needs: python3 (>= 3.9, with venv), Rust (cargo), network access to PyPI (build tools) and crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}

# Build tools, pinned to ranges that were tried (docs/release.md). They go into a venv of their own, made for this run,
# so that the release does not depend on (or change) whatever the machine's python has installed.
MATURIN_REQ="maturin>=1.16,<2"
ZIG_REQ="ziglang>=0.13,<0.18"   # 0.13.0, 0.14.1, 0.15.2 and 0.17.1 tried with maturin 1.16.0
# readme_renderer[md] brings cmarkgfm, the renderer PyPI uses: without it, twine check passes Markdown it never rendered.
# trove-classifiers: PyPI refuses an upload with an unknown classifier, which twine check does not look at.
CHECK_REQS=("auditwheel>=6,<7" "twine>=6,<8" "readme_renderer[md]>=42" "trove-classifiers")

ARCH=$(uname -m)
WANT_TAGS="cp39-abi3-manylinux2014_${ARCH} cp39-abi3-manylinux_2_17_${ARCH}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/zstream-release.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'release.sh: FAILED: %s\n' "$*" >&2; exit 1; }

say "build tools (venv in $WORK/tools)"
"$PYTHON" -m venv "$WORK/tools"
TOOLS=$WORK/tools/bin
"$TOOLS/python" -m pip install -q --disable-pip-version-check "$MATURIN_REQ" "$ZIG_REQ" "${CHECK_REQS[@]}"
# maturin finds zig as `python3 -m ziglang`, so the tools venv goes first on PATH.
export PATH="$TOOLS:$PATH"
"$TOOLS/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(maturin|ziglang|auditwheel|twine|readme.renderer|cmarkgfm) ' | sed 's/^/  /'

say "clean dist/"
rm -rf dist
mkdir dist

say "wheel: maturin build --release --zig --compatibility manylinux2014"
maturin build --release --zig --compatibility manylinux2014 --out dist

say "sdist: maturin sdist"
maturin sdist --out dist

shopt -s nullglob
wheels=(dist/*.whl)
sdists=(dist/*.tar.gz)
shopt -u nullglob
[ ${#wheels[@]} -eq 1 ] || fail "expected one wheel in dist/, found ${#wheels[@]}: ${wheels[*]:-none}"
[ ${#sdists[@]} -eq 1 ] || fail "expected one sdist in dist/, found ${#sdists[@]}: ${sdists[*]:-none}"
WHEEL=${wheels[0]}
SDIST=${sdists[0]}

say "check: wheel tags (the WHEEL file)"
tags=$(unzip -p "$WHEEL" '*.dist-info/WHEEL' | sed -n 's/^Tag: //p' | LC_ALL=C sort | tr '\n' ' ' | sed 's/ $//')
echo "  $tags"
[ "$tags" = "$WANT_TAGS" ] || fail "wheel tags are '$tags', want '$WANT_TAGS'"
case "$(basename "$WHEEL")" in
    zstream-*-cp39-abi3-manylinux2014_${ARCH}.manylinux_2_17_${ARCH}.whl) ;;
    *) fail "unexpected wheel file name $(basename "$WHEEL")" ;;
esac
# (here-strings, not pipes into grep -q: with pipefail, a grep that stops reading early can fail the writer)
wheel_files=$(unzip -Z1 "$WHEEL")
grep -qx 'zstream/_core\.abi3\.so' <<<"$wheel_files" || fail "no zstream/_core.abi3.so in the wheel"

say "check: auditwheel show"
audit=$(auditwheel show "$WHEEL") || { echo "$audit"; fail "auditwheel show failed"; }
echo "$audit" | sed 's/^/  /'
# auditwheel names the most compatible tag the wheel qualifies for; manylinux_2_17 or an older glibc is what we promise.
policy=$(echo "$audit" | tr '\n' ' ' | sed -n 's/.*consistent with the following platform tag: *"\([^"]*\)".*/\1/p')
case "$policy" in
    manylinux_2_*_"$ARCH")
        glibc_minor=${policy#manylinux_2_}; glibc_minor=${glibc_minor%%_*}
        [ "$glibc_minor" -le 17 ] || fail "auditwheel: the wheel needs glibc 2.$glibc_minor, more than manylinux2014's 2.17" ;;
    manylinux1_"$ARCH" | manylinux2010_"$ARCH" | manylinux2014_"$ARCH") ;;
    *) fail "auditwheel: the wheel is consistent with '${policy:-nothing}', not manylinux_2_17 (manylinux2014)" ;;
esac
echo "  -> $policy: installable with glibc >= 2.17"

say "check: twine check --strict"
twine check --strict "$WHEEL" "$SDIST"

say "check: metadata (name, version, classifiers, README as the long description, rendered)"
"$TOOLS/python" - "$WHEEL" "$SDIST" README.md <<'EOF'
import email.parser, re, sys, tarfile, zipfile

import warnings

import readme_renderer.markdown
from trove_classifiers import classifiers as known_classifiers

# "Markdown renderers are not available" must fail, not pass unrendered
warnings.filterwarnings("error", module="readme_renderer")

wheel, sdist, readme_path = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    [meta_name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    wmeta = email.parser.Parser().parsestr(z.read(meta_name).decode())
with tarfile.open(sdist) as t:
    [pkg_info] = [m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
    smeta = email.parser.Parser().parsestr(t.extractfile(pkg_info).read().decode())
with open(readme_path, encoding="utf-8") as f:
    readme = f.read()
for label, m in (("wheel", wmeta), ("sdist", smeta)):
    body = m.get_payload()
    assert m["Name"] == "zstream", (label, m["Name"])
    assert m["Version"] == wmeta["Version"], (label, m["Version"], wmeta["Version"])
    assert m["Requires-Python"] == ">=3.9", (label, m["Requires-Python"])
    assert (m["Description-Content-Type"] or "").startswith("text/markdown"), (label, m["Description-Content-Type"])
    assert body.strip() == readme.strip(), f"{label}: the long description is not README.md"
    html = readme_renderer.markdown.render(body, variant="GFM")
    ok = html and re.search(r"<h1[^>]*>zstream", html) and "<table>" in html and "<pre" in html
    assert ok, f"{label}: the README does not render (no title, table or code block in the HTML)"
    unknown = [c for c in m.get_all("Classifier") or [] if c not in known_classifiers]
    assert not unknown, f"{label}: classifiers PyPI does not know: {unknown}"
    extras = m.get_all("Provides-Extra") or []
    print(f"  {label}: {m['Name']} {m['Version']}, Requires-Python {m['Requires-Python']}, "
          f"{len(m.get_all('Requires-Dist') or [])} Requires-Dist, extras {extras}, "
          f"{len(m.get_all('Classifier') or [])} known classifiers, "
          f"README rendered ({len(html)} bytes of HTML)")
EOF

say "check: the sdist's contents (tar tzf)"
listing=$(tar tzf "$SDIST")
top=${listing%%/*}
required=(PKG-INFO pyproject.toml README.md Cargo.toml Cargo.lock
          rust/zstream-core/Cargo.toml rust/zstream-py/Cargo.toml
          python/zstream/__init__.py python/zstream/py.typed python/zstream/_core.pyi)
# Every tracked file of both crates' sources and of the Python package (when this is a git checkout).
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    while IFS= read -r f; do required+=("$f"); done < <(git -C "$ROOT" ls-files -- \
        'rust/zstream-core/src' 'rust/zstream-core/benches' 'rust/zstream-py/src' 'python/zstream')
fi
# A license file, if pyproject.toml names one (today the license is given as text: Apache-2.0).
while IFS= read -r f; do [ -n "$f" ] && required+=("$f"); done < <("$TOOLS/python" - <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python < 3.11: nothing to check against
    sys.exit(0)
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
lic = project.get("license")
if isinstance(lic, dict) and "file" in lic:
    print(lic["file"])
for f in project.get("license-files", []) if isinstance(project.get("license-files"), list) else []:
    print(f)
EOF
)
missing=()
for f in "${required[@]}"; do
    grep -qxF "$top/$f" <<<"$listing" || missing+=("$f")
done
[ ${#missing[@]} -eq 0 ] || fail "the sdist lacks: ${missing[*]}"
echo "  $(grep -vc '/$' <<<"$listing") files, including the $(printf '%s\n' "${required[@]}" | sort -u | wc -l) required ones"

say "check: the sdist builds from scratch (fresh venv, pip wheel --no-deps)"
"$PYTHON" -m venv "$WORK/sdist-venv"
SV=$WORK/sdist-venv/bin
mkdir "$WORK/sdist-wheel"
# PATH without the tools venv: the build gets its own maturin from the sdist's build-system table, as a user's would.
(cd "$WORK" && env PATH="${PATH#"$TOOLS:"}" "$SV/python" -m pip wheel -q --disable-pip-version-check --no-deps \
    -w "$WORK/sdist-wheel" "$ROOT/$SDIST") || fail "pip wheel could not build the sdist"
shopt -s nullglob
built=("$WORK"/sdist-wheel/zstream-*.whl)
shopt -u nullglob
[ ${#built[@]} -eq 1 ] || fail "pip wheel of the sdist left ${#built[@]} zstream wheels"
echo "  built $(basename "${built[0]}")"
# Same files as the release wheel (the metadata's RECORD/SBOM aside), and it imports from outside the source tree.
diff <(unzip -Z1 "${built[0]}" | grep -v '\.dist-info/' | sort) <(unzip -Z1 "$WHEEL" | grep -v '\.dist-info/' | sort) \
    || fail "the wheel built from the sdist has other files than the release wheel"
"$SV/python" -m pip install -q --disable-pip-version-check --no-deps "${built[0]}"
(cd "$WORK" && "$SV/python" -c '
import importlib.metadata as md, zstream, zstream._core as c
assert "site-packages" in c.__file__, c.__file__
v = md.version("zstream")
assert zstream.__version__ == c.__version__ == v, (zstream.__version__, c.__version__, v)
print("  imports from", c.__file__, "version", v)
') || fail "the wheel built from the sdist does not import"

say "built"
for f in "$WHEEL" "$SDIST"; do
    printf '  %s  %s bytes  sha256 %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
done
echo "  wheel tags: $tags (auditwheel: $policy)"
echo "release.sh: OK"
