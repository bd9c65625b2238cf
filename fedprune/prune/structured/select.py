"""Which units stay: uniform or adaptive allocation of a parameter budget.

*Uniform* (LLM-Pruner's local pruning, FLAP's UL-UM): every group set of a kind removes the
same fraction of its units, ``round(ratio * units)`` (per bucket for query heads under GQA),
so every layer keeps the same shapes and the stock config describes the result.
``ratio_for_fraction`` finds the one ratio (heads and MLP alike, or one kind only) whose
removed parameters come closest to a fraction of the group sets' parameters.

*Adaptive* (FLAP's AL-AM): scores are standardized within each group set,
``z = (s - mean) / std`` (unbiased std, as FLAP's ``torch.std``), all units of all group sets
are ranked together by ``z`` and removed from the least important on until the removed
parameters come closest to the target (FLAP's ``argmin |cumsum(cost) - target|``, which
weights a head by its parameters as FLAP does; here the count is exact, so a CNN weight
shared by two removed channels counts once).
Every group set keeps at least one unit; query-head buckets lose one head per bucket at a
time (the k-th least important of each bucket together, scored by their mean ``z``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .groups import GroupSet, member_layout, params_per_unit

# which group-set kinds a ``prune`` setting offers ("both": everything the model has)
KIND_OF = {"heads": ("attn",), "mlp": ("mlp",), "both": ("attn", "mlp", "channels")}


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores, ascending (ties to the earlier unit)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)


def keep_top(gs: GroupSet, scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Keep all but the ``remove`` least important units (per bucket when bucketed)."""
    if not gs.bucket:
        return _top(scores, gs.units - remove)
    per = remove
    out = [b * gs.bucket + _top(scores[b * gs.bucket:(b + 1) * gs.bucket], gs.bucket - per)
           for b in range(gs.units // gs.bucket)]
    return torch.cat(out)


def round_kept(kept: int, units: int, round_to: int) -> int:
    """``kept`` rounded to the nearest multiple of ``round_to`` (at least one multiple, at
    most ``units``); sets smaller than ``round_to`` and ``round_to <= 1`` are left alone.
    Matrix sizes that are multiples of 8-64 run markedly faster on CPUs and GPUs."""
    if round_to <= 1 or units < round_to or kept == units:
        return kept
    return min(units, max(round_to, round(kept / round_to) * round_to))


def removal_count(gs: GroupSet, ratio: float, setting: str, round_to: int = 0) -> int:
    """Units removed from ``gs`` at ``ratio`` (per bucket when bucketed); refuses all.
    Unbucketed sets keep a multiple of ``round_to`` units."""
    size = gs.bucket or gs.units
    remove = round(ratio * size)
    if not gs.bucket:
        remove = size - round_kept(size - remove, size, round_to)
    if remove >= size:
        what = f"every {gs.unit_label} of a key/value group" if gs.bucket else \
            f"every {gs.unit_label}"
        raise ValueError(f"{gs.name}: {setting}={ratio} would remove {what} ({remove} of "
                         f"{size}); lower it")
    return remove


def uniform_keep(groups: list[GroupSet], scores: Mapping[str, torch.Tensor],
                 ratios: Mapping[str, float], round_to: int = 0) -> dict[str, torch.Tensor]:
    """Keep per group set at the ratio of its kind (``ratios["attn"]``, ``["mlp"]``, ...)."""
    keep = {}
    for gs in groups:
        ratio = ratios.get(gs.kind, 0.0)
        if ratio <= 0:
            continue
        remove = removal_count(gs, ratio, f"{gs.kind} ratio", round_to)
        keep[gs.name] = keep_top(gs, scores[gs.name], remove)
    return keep


def removed_params(groups: list[GroupSet], modules: Mapping[str, nn.Module],
                   keep: Mapping[str, torch.Tensor]) -> int:
    """Exactly how many parameters removing the units not in ``keep`` removes. A weight
    entry can belong to two units (a conv's output channel and the next conv's input
    channel, in a CNN); it is counted once."""
    gone: dict[tuple[str, str], int] = {}
    for gs in groups:
        if gs.name not in keep:
            continue
        lost = gs.units - keep[gs.name].numel()
        for m in gs.members:
            key = (m.module, m.axis)
            gone[key] = gone.get(key, 0) + lost * m.index.shape[1]
    total = 0
    for name in {n for n, _ in gone}:
        module = modules[name]
        w = module.weight
        out_n, in_n = w.shape[member_layout(module, "out")], (
            w.shape[member_layout(module, "in")] if w.dim() > 1 else 1)
        r_out, r_in = gone.get((name, "out"), 0), gone.get((name, "in"), 0)
        kept = w.numel() * (out_n - r_out) * (in_n - r_in) // (out_n * in_n)
        total += w.numel() - kept
        if getattr(module, "bias", None) is not None:
            total += r_out
    return total


def total_params(groups: list[GroupSet], modules: Mapping[str, nn.Module]) -> int:
    """Parameters of every layer that a member of ``groups`` touches."""
    names = {m.module for gs in groups for m in gs.members}
    return sum(sum(p.numel() for p in modules[n].parameters(recurse=False)) for n in names)


def first_keep(gs: GroupSet, remove: int) -> torch.Tensor:
    """The first units of ``gs`` minus ``remove`` (per bucket when bucketed): a keep of the
    right size (counts are all that parameter counting and shape rebuilding need)."""
    if not gs.bucket:
        return torch.arange(gs.units - remove)
    return torch.cat([b * gs.bucket + torch.arange(gs.bucket - remove)
                      for b in range(gs.units // gs.bucket)])


def ratio_for_fraction(groups: list[GroupSet], modules: Mapping[str, nn.Module],
                       target: float, kinds: tuple[str, ...], step: float = 0.0025,
                       round_to: int = 0) -> float:
    """The uniform ratio whose removed parameters come closest to ``target`` (a count; only
    ``kinds`` pruned); rounding makes the achieved count a step function of the ratio, so
    candidate ratios are scanned."""
    chosen = [gs for gs in groups if gs.kind in kinds]
    best, best_err, r = None, None, 0.0
    while r < 1.0:
        try:
            keep = {gs.name: first_keep(gs, removal_count(gs, r, "ratio", round_to))
                    for gs in chosen}
        except ValueError:
            break
        err = abs(removed_params(chosen, modules, keep) - target)
        if best_err is None or err < best_err - 1e-9:
            best, best_err = r, err
        r = round(r + step, 6)
    if best is None:
        raise ValueError(f"no uniform ratio removes {int(target)} parameters")
    return best


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` with the unbiased std; all-equal scores give zeros."""
    s = scores.to(torch.float64)
    if s.numel() < 2:
        return torch.zeros_like(s)
    std = s.std()
    return (s - s.mean()) / std if std > 0 else torch.zeros_like(s)


def _candidates(gs: GroupSet, z: torch.Tensor, cost: int) -> list[tuple[float, int, str, list[int]]]:
    """Removal candidates of one group set in the order they must go: (score, cost, set, units)."""
    if not gs.bucket:
        order = sorted(range(gs.units), key=lambda i: (float(z[i]), i))[:-1]  # keep >= 1
        return [(float(z[i]), cost, gs.name, [i]) for i in order]
    buckets = [sorted(range(b * gs.bucket, (b + 1) * gs.bucket), key=lambda i: (float(z[i]), i))
               for b in range(gs.units // gs.bucket)]
    out = []
    for k in range(gs.bucket - 1):
        units = [b[k] for b in buckets]
        out.append((float(z[units].mean()), cost * len(units), gs.name, units))
    return out


def _adaptive_prefix(cands: list, groups: list[GroupSet], n: int) -> dict[str, torch.Tensor]:
    gone: dict[str, set[int]] = {gs.name: set() for gs in groups}
    for c in cands[:n]:
        gone[c[2]].update(c[3])
    return {gs.name: torch.tensor([i for i in range(gs.units) if i not in gone[gs.name]],
                                  dtype=torch.long) for gs in groups if gone[gs.name]}


def rounded(groups: list[GroupSet], scores: Mapping[str, torch.Tensor],
            keep: Mapping[str, torch.Tensor], round_to: int) -> dict[str, torch.Tensor]:
    """``keep`` with every unbucketed set's kept count rounded to a multiple of
    ``round_to`` (the top-scored units of the set)."""
    out = dict(keep)
    for gs in groups:
        if gs.name not in keep or gs.bucket:
            continue
        kept = round_kept(keep[gs.name].numel(), gs.units, round_to)
        out[gs.name] = keep_top(gs, scores[gs.name], gs.units - kept)
    return out


def adaptive_keep(groups: list[GroupSet], scores: Mapping[str, torch.Tensor],
                  modules: Mapping[str, nn.Module], target: float) -> dict[str, torch.Tensor]:
    """Global removal by standardized score until the removed parameters (exactly counted)
    come closest to ``target`` (a count)."""
    cands = []
    for gs in groups:
        cands += _candidates(gs, standardize(scores[gs.name]), params_per_unit(gs, modules))
    cands.sort(key=lambda c: c[0])  # stable: a set's candidates keep their own order
    removed = lambda n: removed_params(groups, modules, _adaptive_prefix(cands, groups, n))
    lo, hi = 0, len(cands)  # smallest prefix removing >= target, by bisection (monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((n for n in (lo - 1, lo) if 0 <= n <= len(cands)),
               key=lambda n: abs(removed(n) - target))
    return _adaptive_prefix(cands, groups, best)
