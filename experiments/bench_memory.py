"""Measured client memory and FLOPs of one local step: dense, FedTiny, dense-gradient.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/bench_memory.py \
        --out experiments/results/memory --models resnet8 resnet18 --densities 0.01 0.05 0.1

Checks FedTiny's claim (Huang et al. 2023) that its client pruning memory is at most a tenth
of the dense-gradient approach's. Each row is ``fedprune.fl.memory.step_memory`` (see its
module docstring for what is counted); resnet8 runs at width 16, resnet18 at width 64 (the
CIFAR ResNet-18). Writes memory.md, memory.json and client_memory.png to ``--out``.

The RSS columns are a whole-process cross-check: glibc's mmap threshold is fixed at 64 KiB
here so that freed large blocks go back to the kernel and show again when reused.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from fedprune.config import ModelConfig
from fedprune.fl.memory import METHODS, step_memory

WIDTHS = {"resnet8": 16, "resnet18": 64, "vgg11_bn": 64}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("experiments/results/memory"))
    p.add_argument("--models", nargs="+", default=["resnet8", "resnet18"], choices=list(WIDTHS))
    p.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.05, 0.1])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or platform.machine())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "gpu": gpu, "platform": platform.platform(), "python":
            platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def run_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.models:
        cfg = ModelConfig(name=name, width=WIDTHS[name])
        jobs = [("dense", 1.0)] + [(m, d) for d in args.densities for m in METHODS[1:]]
        for method, density in jobs:
            t0 = time.perf_counter()
            row = step_memory(cfg, "cifar10", density, method, args.batch_size, args.device)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            print(f"{name} d={density} {method}: step {row['step_peak_bytes'] / MB:.2f} MB, "
                  f"pruning {row['pruning_peak_bytes'] / MB:.4f} MB ({row['seconds']} s)",
                  flush=True)
            rows.append(row)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """fedtiny / dense_grad per (model, density), for tensor peak, held state and RSS
    (RSS only where the dense-gradient one is at least 1 MB: below, RSS is noise)."""
    by = {(r["model"], r["density"], r["method"]): r for r in rows}
    out = []
    for (model, density, method), ft in by.items():
        dg = by.get((model, density, "dense_grad"))
        if method != "fedtiny" or dg is None:
            continue
        rss_ok = (dg["pruning_rss_bytes"] or 0) >= MB
        out.append({"model": model, "density": density,
                    "peak": ft["pruning_peak_bytes"] / dg["pruning_peak_bytes"],
                    "state": ft["pruning_state_bytes"] / dg["pruning_state_bytes"],
                    "rss": ft["pruning_rss_bytes"] / dg["pruning_rss_bytes"] if rss_ok else None})
    return out


def _mb(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x / MB:.{digits}f}"


def markdown(rows: list[dict], ratio_rows: list[dict], info: dict) -> str:
    ratio = {(r["model"], r["density"]): r["peak"] for r in ratio_rows}
    lines = [
        "# Client memory and FLOPs of one local training step", "",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']['cpu']} ({info['machine']['platform']}), torch "
        f"{info['machine']['torch']}, {info['machine']['torch_threads']} threads, "
        f"device {info['device']}, batch {info['batch_size']}, CIFAR-10 shape, random batch.",
        "", "MB = 10^6 bytes. *Step* = peak tensor storage of one local step above the "
        "parameters (activations, gradients, momentum, train_local's bool masks, the "
        "method's bookkeeping). *Pruning* = the bookkeeping alone over two `add_` calls on a "
        "real gradient (tensor peak; *held* = what stays between steps). RSS = process "
        "peak resident set above the start (sees native scratch, e.g. CPU `torch.topk`'s "
        "16 bytes per element; only newly touched pages). Ratio = FedTiny / dense-gradient "
        "pruning tensor peak. Training GFLOPs per step (batch), inference MFLOPs per example.",
        "",
        "| model | density | method | params MB | step MB | step RSS MB | pruning MB | "
        "pruning held MB | pruning RSS MB | ratio | train GFLOPs/step | infer MFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rat = ratio.get((r["model"], r["density"])) if r["method"] == "fedtiny" else None
        lines.append(
            f"| {r['model']}-w{r['width']} | {r['density']:g} | {r['method']} | "
            f"{_mb(r['params_bytes'], 2)} | {_mb(r['step_peak_bytes'], 2)} | "
            f"{_mb(r['step_rss_bytes'], 2)} | {_mb(r['pruning_peak_bytes'], 4)} | "
            f"{_mb(r['pruning_state_bytes'], 4)} | {_mb(r['pruning_rss_bytes'], 3)} | "
            f"{'' if rat is None else f'{rat:.3f}'} | "
            f"{r['training_flops'] * r['batch_size'] / 1e9:.3f} | "
            f"{r['inference_flops'] / 1e6:.2f} |")
    lines += ["", "## Target: FedTiny's pruning memory <= 1/10 of the dense-gradient approach",
              "", "| model | density | tensor peak ratio | held ratio | RSS ratio | "
              "tensor peak <= 0.1 |", "|---|---|---|---|---|---|"]
    for r in ratio_rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['density']:g} | {fmt(r['peak'])} | "
                     f"{fmt(r['state'])} | {fmt(r['rss'])} | "
                     f"{'yes' if r['peak'] is not None and r['peak'] <= 0.1 else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["density"]) for r in rows
                                if r["method"] != "dense"))
    panels = (("step_peak_bytes", "peak memory of one local step (tensor storage)",
               [(m, "step_peak_bytes", m, None) for m in METHODS]),
              ("pruning_peak_bytes", "pruning memory: the bookkeeping alone",
               [("fedtiny", "pruning_peak_bytes", "fedtiny (tensor storage)", None),
                ("dense_grad", "pruning_peak_bytes", "dense_grad (tensor storage)", None),
                ("fedtiny", "pruning_rss_bytes", "fedtiny (RSS: + topk's native scratch)",
                 "//")]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (_, title, series) in zip(axes, panels):
        width = 0.8 / len(series)
        for i, (method, key, label, hatch) in enumerate(series):
            vals = [(_lookup(rows, m, d, method)[key] or 0) / MB for m, d in groups]
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, vals, width=width, label=label, hatch=hatch,
                   color=f"C{METHODS.index(method)}", alpha=0.5 if hatch else 1.0)
        ax.set_xticks(range(len(groups)), [f"{m}\nd={d:g}" for m, d in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("MB")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lookup(rows: list[dict], model: str, density: float, method: str) -> dict:
    """The row; dense has one row per model (density 1.0)."""
    want = 1.0 if method == "dense" else density
    return next(r for r in rows if (r["model"], r["density"], r["method"]) ==
                (model, want, method))


def fix_mmap_threshold(nbytes: int = 64 * 1024) -> None:
    """Make glibc mmap every block >= nbytes (and unmap it on free), for the RSS columns."""
    if not ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fix_mmap_threshold()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("OMP_NUM_THREADS")
    env = [f"OMP_NUM_THREADS={threads}"] if threads else []
    info = {"command": shlex.join([*env, os.path.relpath(sys.executable), *sys.argv]),
            "machine": machine(), "device": args.device, "batch_size": args.batch_size}
    rows = run_rows(args)
    ratio_rows = ratios(rows)
    (args.out / "memory.json").write_text(json.dumps(
        {**info, "rows": rows, "ratios": ratio_rows}, indent=1))
    (args.out / "memory.md").write_text(markdown(rows, ratio_rows, info))
    plot(rows, args.out / "client_memory.png")
    print((args.out / "memory.md").read_text())


if __name__ == "__main__":
    main()
