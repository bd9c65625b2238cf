"""The non-IID study of federated LLM pruning: protocols x text partitions x clients.

For each cell (partition, number of clients, pruner, sparsity) the clients' windows come
from ``fedprune.lm.clients.partition_text`` (the same windows a Flower run's clients hold),
with a fixed total of ``--total-windows`` windows split evenly among the clients, and the
script measures, on every source's held-out test windows:

- ``centralized``: sequential pruning on the union of the clients' windows. This is also
  what the ``pooled`` protocol returns (tested equal end to end through Flower:
  tests/test_fedllm.py, identical weights for Wanda, within 1e-5 for SparseGPT).
- ``mask-vote`` / ``l0-average``: the server's combining rules
  (``fedprune.prune.consensus``, the code the Flower methods call) applied to the clients'
  own results, accumulated one client at a time (vote counts; sums of kept values), which
  is what the Flower methods compute (tested: tests/test_fedllm.py).
- ``alone``: each client's own pruned model (what a client gets without federating),
  evaluated like the others.

It runs the protocols' arithmetic without Flower's transport, so a cell costs its pruning
and evaluation only; bytes per client come from the Flower runs in the README. Each cell
is written to ``<out>/cells/<cell>.json`` as it ends; a rerun skips finished cells.

  FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/study_llm.py \\
      --out experiments/results/llm_study
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import fedprune.prune.methods  # noqa: F401  (registers the pruners)
from fedprune.config import TextConfig
from fedprune.data.cache import atomic_write
from fedprune.lm.clients import partition_text
from fedprune.lm.loading import load_causal_lm
from fedprune.lm.perplexity import perplexity
from fedprune.prune.adapters import adapter_for
from fedprune.prune.base import SparsityTarget, get_pruner
from fedprune.prune.consensus import l0_select, vote_select
from fedprune.prune.pipeline import prune_model

PARTITIONS = {"domain": ("domain", 1.0), "dirichlet0.1": ("dirichlet", 0.1),
              "dirichlet1.0": ("dirichlet", 1.0), "iid": ("iid", 1.0)}


def cell_name(partition: str, clients: int, pruner: str, target: str) -> str:
    return f"{partition}-c{clients}-{pruner}-{target.replace(':', 'of')}"


def layers(model) -> dict[str, torch.nn.Module]:
    adapter = adapter_for(model)
    return {n: m for b in adapter.blocks(model) for n, m in adapter.prunable(b).items()}


def evaluate(model, tokenizer, sources, args) -> dict[str, float]:
    return {s: float(perplexity(model, tokenizer, f"{s}:test:{args.eval_windows}x"
                                f"{args.eval_length}", progress=False)["ppl"]) for s in sources}


class Accumulator:
    """Per layer: how many clients kept each weight, and the sum of their kept values."""

    def __init__(self, model) -> None:
        self.votes = {n: torch.zeros(m.weight.shape, dtype=torch.int16)
                      for n, m in layers(model).items()}
        self.sums = {n: torch.zeros(m.weight.shape, dtype=torch.float64)
                     for n, m in layers(model).items()}
        self.clients = 0

    def add(self, pruned, masks: dict[str, torch.Tensor]) -> None:
        for name, module in layers(pruned).items():
            mask = masks[name]  # in the weight's own layout
            self.votes[name] += mask.to(torch.int16)
            self.sums[name] += module.weight.detach().double().masked_fill(~mask, 0)
        self.clients += 1

    def combined(self, dense, target: SparsityTarget) -> tuple:
        """(mask-vote model, l0-average model) built from the accumulated clients."""
        vote, l0 = copy.deepcopy(dense), copy.deepcopy(dense)
        with torch.no_grad():
            for (name, a), b in zip(layers(vote).items(), layers(l0).values()):
                weight, _ = vote_select(self.votes[name], self.clients, a.weight.detach(),
                                        target)
                a.weight.copy_(weight)
                weight, _ = l0_select(self.sums[name], self.votes[name], target)
                b.weight.copy_(weight)
        return vote, l0


def run_cell(partition: str, clients: int, pruner_name: str, target_text: str, dense,
             tokenizer, args) -> dict:
    kind, alpha = PARTITIONS[partition]
    text = TextConfig(sources=args.sources, partitioner=kind, alpha=alpha,
                      windows=args.total_windows // clients, length=args.length, seed=args.seed)
    parts = partition_text(text, clients, tokenizer)
    pruner = get_pruner(pruner_name)
    target = SparsityTarget.parse(0.0 if ":" in target_text else float(target_text),
                                  target_text if ":" in target_text else None)
    out = {"partition": partition, "clients": clients, "pruner": pruner_name,
           "target": target_text, "windows_per_client": text.windows, "alone": []}
    seconds = {"alone": 0.0, "centralized": 0.0, "eval": 0.0}
    acc = Accumulator(dense)
    for c in parts:
        t = time.time()
        model = copy.deepcopy(dense)
        report = prune_model(model, pruner, target, list(c.windows.split(1)),
                             sequential=True, progress=False)
        acc.add(model, report.masks)
        seconds["alone"] += time.time() - t
        t = time.time()
        out["alone"].append({"sources": {s: c.sources.count(s) for s in args.sources},
                             "ppl": evaluate(model, tokenizer, args.sources, args)})
        seconds["eval"] += time.time() - t
        del model
    t = time.time()
    central = copy.deepcopy(dense)
    union = torch.cat([c.windows for c in parts])
    prune_model(central, pruner, target, list(union.split(1)), sequential=True, progress=False)
    seconds["centralized"] = time.time() - t
    vote, l0 = acc.combined(dense, target)
    t = time.time()
    out["centralized"] = evaluate(central, tokenizer, args.sources, args)
    out["mask-vote"] = evaluate(vote, tokenizer, args.sources, args)
    same = all(torch.equal(a.weight, b.weight) for a, b in
               zip(layers(vote).values(), layers(l0).values()))
    out["l0_equals_vote"] = same  # Wanda keeps dense values: l0-average is mask-vote
    out["l0-average"] = out["mask-vote"] if same else evaluate(l0, tokenizer, args.sources,
                                                                args)
    seconds["eval"] += time.time() - t
    out["seconds"] = seconds
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/llm_study")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    ap.add_argument("--clients", nargs="+", type=int, default=[4, 16])
    ap.add_argument("--pruners", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--targets", nargs="+", default=["0.5", "2:4"])
    ap.add_argument("--sources", nargs="+", default=["ptb", "wikitext2", "shakespeare"])
    ap.add_argument("--total-windows", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    dense, tokenizer = load_causal_lm(args.model)
    dense.eval()
    dense_file = out / "dense.json"
    if not dense_file.is_file():
        atomic_write(dense_file, lambda f: f.write(json.dumps(
            {"ppl": evaluate(dense, tokenizer, args.sources, args), "args": vars(args),
             "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"},
            indent=2).encode()))
    for pruner in args.pruners:
        for target in args.targets:
            for clients in args.clients:
                for partition in args.partitions:
                    path = out / "cells" / f"{cell_name(partition, clients, pruner, target)}.json"
                    if path.is_file():
                        continue
                    t = time.time()
                    cell = run_cell(partition, clients, pruner, target, dense, tokenizer, args)
                    cell["wall_seconds"] = time.time() - t
                    atomic_write(path, lambda f: f.write(json.dumps(cell, indent=2).encode()))
                    print(f"[study] {path.stem}: {cell['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
