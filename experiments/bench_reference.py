"""Our Wanda and SparseGPT beside the papers' reference code, on the same windows and machine.

    .venv/bin/python experiments/bench_reference.py --wanda-repo PATH/TO/locuslab/wanda \
        --out experiments/results/reference

``--wanda-repo`` is a checkout of https://github.com/locuslab/wanda (its ``lib/prune.py``
holds ``prune_wanda`` and ``prune_sparsegpt``, the latter a copy of IST-DASLab/sparsegpt's
``llama_sequential`` at f5c2500). Nothing of it is copied here: it is imported from that
path at run time, with three shims that change no arithmetic: its calibration loader
(``get_loaders("c4")``, a hub download) returns our windows instead; Llama decoder layers
of transformers >= 4.48 need ``position_embeddings``, which its layer loop does not pass,
so they are computed from ``position_ids`` the way the model does; ``torch.cuda.synchronize``
is a no-op on a CPU build.

Each row runs in its own process, one after the other (so peak RSS and time are that
row's own, and no two rows share the 2 cores): the same SmolLM2-135M (fp32), the same
calibration windows (``--calib``, drawn by ``calibration_batches`` with seed 0), 50%
unstructured, then perplexity with ``fedprune.lm.perplexity`` on the same evaluation
windows. SparseGPT's result moves with float rounding (a different summation order of the
same Hessian changes a few mask entries in the first block, and every later block sees
other inputs), so its rows are repeated over ``--seeds`` calibration draws and compared by
their mean. ``forward`` is one plain forward pass over the calibration windows (batch 1), the
unit of the sequential path's floor (two block passes per block, i.e. two plain passes).
``--save-weights`` keeps each row's pruned layers to compare them layer by layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"
ROWS = ("forward", "ours-wanda", "ref-wanda", "ours-sparsegpt", "ref-sparsegpt")


def _load(calib: str, seed: int):
    from fedprune.lm import calibration_batches, load_causal_lm

    model, tok = load_causal_lm(MODEL)
    return model, tok, calibration_batches(tok, calib, seed=seed)  # (N, L)


def _ours(method: str, model, ids) -> None:
    from fedprune.prune import methods  # noqa: F401  (registers the pruners)
    from fedprune.prune.base import SparsityTarget, get_pruner
    from fedprune.prune.pipeline import prune_model

    prune_model(model, get_pruner(method), SparsityTarget.parse(0.5, "", "layer"),
                list(ids.split(1)), "cpu", sequential=True, progress=False)


def _reference(method: str, model, tok, ids, repo: Path) -> None:
    import torch

    torch.cuda.synchronize = lambda *a, **k: None  # the reference times its GPU kernels
    sys.path.insert(0, str(repo))
    import lib.prune as ref  # the reference code, from the user's checkout
    from transformers.models.llama import modeling_llama

    ref.get_loaders = lambda *a, **k: ([(row, None) for row in ids.split(1)], None)
    rotary = model.model.rotary_emb
    layer_forward = modeling_llama.LlamaDecoderLayer.forward

    def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
        if position_embeddings is None:  # the reference's layer loop predates this argument
            position_embeddings = rotary(hidden_states, kwargs["position_ids"])
        return layer_forward(self, hidden_states, *args,
                             position_embeddings=position_embeddings, **kwargs)

    modeling_llama.LlamaDecoderLayer.forward = forward
    model.seqlen, model.hf_device_map = ids.shape[1], {}
    args = argparse.Namespace(nsamples=ids.shape[0], seed=0, sparsity_ratio=0.5,
                              use_variant=False)
    prune = ref.prune_wanda if method == "wanda" else ref.prune_sparsegpt
    with torch.no_grad():
        prune(args, model, tok, torch.device("cpu"))


def _forward(model, ids) -> None:
    import torch

    with torch.no_grad():
        for row in ids.split(1):
            model(row, use_cache=False)


def run_row(row: str, seed: int, calib: str, evaluation: str, repo: Path | None,
            save: Path | None) -> dict:
    from fedprune.lm import perplexity

    model, tok, ids = _load(calib, seed)
    model.eval()
    _forward(model, ids[:1])  # warm-up: first-call allocations stay out of every row
    t0 = time.perf_counter()
    if row == "forward":
        _forward(model, ids)
    elif row.startswith("ours-"):
        _ours(row.split("-", 1)[1], model, ids)
    else:
        if repo is None:
            raise SystemExit(f"row {row!r} needs --wanda-repo")
        _reference(row.split("-", 1)[1], model, tok, ids, repo)
    seconds = time.perf_counter() - t0
    out = {"row": row, "seed": seed, "seconds": seconds,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if row != "forward":
        out["ppl"] = perplexity(model, tok, evaluation, progress=False)["ppl"]
        if save is not None:
            from safetensors.torch import save_file

            layers = {n: m.weight.detach().contiguous() for n, m in model.named_modules()
                      if n.startswith("model.layers.") and hasattr(m, "weight")
                      and m.weight.dim() == 2}
            save_file(layers, str(save / f"{row}-seed{seed}.safetensors"))
    return out


def layer_check(repo: Path, calib: str, blocks: list[int]) -> list[dict]:
    """Our ``sparsegpt_prune`` and the reference's ``SparseGPT.fasterprune`` on the same
    layer, fed the same inputs (the dense model's, up to each block): mask agreement and
    the ratio of their reconstruction errors ``||X dW^T||^2`` (from our float64 Gram)."""
    import copy

    import torch

    from fedprune.prune.adapters import adapter_for
    from fedprune.prune.base import SparsityTarget
    from fedprune.prune.calibrate import collect_stats, propagate
    from fedprune.prune.methods.sparsegpt import reconstruction_error, sparsegpt_prune

    torch.cuda.synchronize = lambda *a, **k: None
    sys.path.insert(0, str(repo))
    from lib.sparsegpt import SparseGPT  # the reference, from the user's checkout

    model, _, ids = _load(calib, 0)
    adapter = adapter_for(model)
    inputs = adapter.capture_inputs(model, list(ids.split(1)), "cpu")
    rows = []
    with torch.no_grad():
        for block in adapter.blocks(model):
            if block.index > max(blocks):
                break
            if block.index in blocks:
                modules = adapter.prunable(block)
                stats = collect_stats(adapter, block, inputs, list(modules),
                                      {"sq_norm", "gram"}, "cpu")
                for name, module in modules.items():
                    ours = sparsegpt_prune(module.weight, stats[name].gram, stats[name].rows,
                                           SparsityTarget(0.5))
                    layer = copy.deepcopy(module)
                    ref = SparseGPT(layer)
                    handle = module.register_forward_hook(
                        lambda m, a, o, ref=ref: ref.add_batch(a[0].data, o.data))
                    for inp in inputs:
                        adapter.run_block(block, inp)
                    handle.remove()
                    ref.fasterprune(0.5, prune_n=0, prune_m=0, percdamp=0.01, blocksize=128)
                    theirs = layer.weight.detach()
                    gram = stats[name].gram
                    rows.append({"layer": name, "mask_agreement": float(
                        (ours.mask == (theirs != 0)).float().mean()), "error_ratio":
                        reconstruction_error(module.weight, ours.weight, gram)
                        / reconstruction_error(module.weight, theirs, gram)})
            inputs = propagate(adapter, block, inputs)  # dense outputs
    return rows


def agreement(out: Path, method: str, seed: int) -> list[dict]:
    """Per block: the share of weights both implementations keep or both prune, and the
    relative distance of the weights (``--save-weights`` runs of ours and the reference)."""
    from safetensors.torch import load_file

    ours = load_file(str(out / f"ours-{method}-seed{seed}.safetensors"))
    ref = load_file(str(out / f"ref-{method}-seed{seed}.safetensors"))
    blocks: dict[int, list] = {}
    for name, a in ours.items():
        b = ref[name]
        blocks.setdefault(int(name.split(".")[2]), []).append(
            (((a != 0) == (b != 0)).sum().item(), a.numel(), (a - b).norm().item() ** 2,
             b.norm().item() ** 2))
    return [{"block": i, "mask_agreement": sum(x[0] for x in v) / sum(x[1] for x in v),
             "weight_distance": (sum(x[2] for x in v) / sum(x[3] for x in v)) ** 0.5}
            for i, v in sorted(blocks.items())]


def to_markdown(rows: list[dict], meta: dict) -> str:
    fwd = next((r["seconds"] for r in rows if r["row"] == "forward"), None)
    lines = ["| row | calibration seed | pruning time (s) | x two plain passes | WikiText-2 ppl "
             "| peak RSS (GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['seconds'] / (2 * fwd):.2f}" if fwd and r["row"] != "forward" else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        lines.append(f"| {r['row']} | {r['seed']} | {r['seconds']:.1f} | {ratio} | {ppl} | "
                     f"{r['peak_rss_gb']:.2f} |")
    for name in sorted({r["row"] for r in rows if "ppl" in r}):
        ppls = [r["ppl"] for r in rows if r["row"] == name]
        if len(ppls) > 1:
            lines.append(f"| {name}: mean over seeds | {len(ppls)} | - | - | "
                         f"{sum(ppls) / len(ppls):.2f} | - |")
    lines.append("")
    lines.append(f"Model {MODEL} fp32, calibration {meta['calib']}, evaluation "
                 f"{meta['eval']}, 50% unstructured, sequential. Machine: {meta['machine']}. "
                 f"Command: `{meta['command']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wanda-repo", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/reference"))
    parser.add_argument("--calib", default="ptb:64x512")
    parser.add_argument("--eval", default="wikitext2:64x512")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="calibration draws for the SparseGPT rows (Wanda and the "
                             "forward pass use the first)")
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # one row, in-process
    parser.add_argument("--save-weights", action="store_true")
    parser.add_argument("--layer-check", nargs="*", type=int, metavar="BLOCK",
                        help="only compare single SparseGPT layers on equal inputs in these "
                             "blocks (writes layer_check.json)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    save = args.out if args.save_weights else None
    if args.layer_check:
        rows = layer_check(args.wanda_repo, args.calib, args.layer_check)
        (args.out / "layer_check.json").write_text(json.dumps(rows, indent=1))
        for r in rows:
            print(f"{r['layer']}: mask agreement {r['mask_agreement']:.4f}, error ratio "
                  f"(ours / reference) {r['error_ratio']:.4f}")
        return
    if args.row:
        result = run_row(args.row, args.seeds[0], args.calib, args.eval, args.wanda_repo, save)
        (args.out / f"{args.row}-seed{args.seeds[0]}.json").write_text(json.dumps(result,
                                                                              indent=1))
        return
    rows = []
    plan = [(row, seed) for row in args.rows
            for seed in (args.seeds if "sparsegpt" in row else args.seeds[:1])]
    for row, seed in plan:  # one process per row, never two at once
        cmd = [sys.executable, __file__, "--row", row, "--seeds", str(seed), "--out",
               str(args.out), "--calib", args.calib, "--eval", args.eval]
        cmd += ["--wanda-repo", str(args.wanda_repo)] if args.wanda_repo else []
        cmd += ["--save-weights"] if args.save_weights else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"row {row} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads((args.out / f"{row}-seed{seed}.json").read_text()))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"calib": args.calib, "eval": args.eval,
            "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                       f"cores, {platform.python_version()}",
            "command": "experiments/bench_reference.py " + " ".join(sys.argv[1:])}
    result = {"meta": meta, "rows": rows}
    text = to_markdown(rows, meta)
    if args.save_weights:  # where the two runs part: block by block, first seed
        result["agreement"] = {m: agreement(args.out, m, args.seeds[0])
                               for m in ("wanda", "sparsegpt")
                               if {f"ours-{m}", f"ref-{m}"} <= set(args.rows)}
        for method, blocks in result["agreement"].items():
            text += (f"\n{method}, ours vs reference, seed {args.seeds[0]}: mask agreement per "
                     "block " + ", ".join(f"{b['mask_agreement']:.4f}" for b in blocks)
                     + "; relative weight distance " + ", ".join(
                         f"{b['weight_distance']:.3f}" for b in blocks) + "\n")
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
