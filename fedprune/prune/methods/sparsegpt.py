"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML, arXiv 2301.00774): mask selection and OBS weight reconstruction.

Layer problem: ``min ||X W_new^T - X W^T||_F^2`` with ``W_new`` zero outside the mask, for
calibration inputs ``X`` (rows, in). Hessian ``H = 2 X^T X / rows`` (from ``LayerStats.gram``).

Algorithm (paper Alg. 1, reference ``sparsegpt.py`` ``fasterprune``):

1. Dead inputs (``H_jj = 0``): ``W[:, j] = 0``, ``H_jj = 1``.
2. Dampening ``H += lambda I``, ``lambda = percdamp * mean(diag H)`` (default 1%).
3. ``U = chol_upper(H^-1)``: row ``j`` of the upper Cholesky factor of ``H^-1`` is the
   ``j``-th row of the inverse Hessian of the columns ``j..in-1`` still free, divided by
   the square root of its diagonal, so ``U_jj^2 = [H_{j:,j:}^-1]_jj``.
4. Columns are processed left to right in blocks of ``B`` (lazy batch updates; default 128):
   - adaptive mask: at the start of each block (unstructured), the OBS saliency
     ``w_ij^2 / U_jj^2`` of the *current* (already updated) weights of the ``(out, B)`` block is
     ranked over the whole block and the lowest are pruned; for N:M, at every ``m``-th column
     the ``n`` lowest saliencies of each row's next ``m`` columns are pruned;
   - column ``j``: ``q = w * mask``, ``err = (w - q) / U_jj``,
     ``W[:, j:B_end] -= err U[j, j:B_end]`` (OBS update of the block's later columns);
   - after the block: ``W[:, B_end:] -= Err U[block, B_end:]`` (one matmul).
   The OBS loss ``sum err^2 / 2`` is the increase of ``1/2 dW H dW^T``, so
   ``rows * sum err^2 / 2`` is the layer's reconstruction error ``||X dW^T||_F^2`` under the
   damped Hessian (exact when ``percdamp = 0``); it is returned as ``SparseGPTOutput.error``.

Precision: the Hessian, dampening and the three factorisations (Cholesky of ``H``,
``cholesky_inverse``, upper Cholesky of ``H^-1``) run in float64 (``H^-1`` of a nearly
singular Gram loses digits in float32; at in=1536 this costs ~0.1 s on CPU); the column
sweep and updates run in float32 on the weight's device, as in the reference.

Differences from the reference code: (a) per block the reference prunes every saliency
``<= sorted[int(s * numel)]``, i.e. ``int(s * numel) + 1`` entries plus ties; here exactly
``round(s * rows * end) - round(s * rows * start)`` entries per block, so the layer has exactly
``round(s * numel)`` zeros, ties broken by position; (b) scope "row" (each row its exact share
of every block) is an extension, the paper ranks over the whole block ("layer", the default);
(c) the reference scales ``H`` by ``2 / #sequences`` rather than ``2 / #rows`` (the algorithm
is invariant to the scale; only the reported loss changes); (d) a non-positive-definite
damped Hessian is an error naming ``sparsegpt.percdamp`` instead of a crash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ConfigError
from ...masks.select import select_nm, topk_rows_mask
from ..base import LayerStats, Pruner, PruneResult, SparsityTarget, register_pruner


@dataclass
class SparseGPTConfig:
    blocksize: int = 128  # B: columns per lazy-update / mask-selection block (paper: 128)
    percdamp: float = 0.01  # dampening as a fraction of mean(diag H) (paper: 1%)

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) \
                or self.blocksize < 1:
            raise ConfigError(f"sparsegpt.blocksize={self.blocksize!r} is not valid: "
                              "must be an integer >= 1")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) \
                or not 0.0 <= self.percdamp < float("inf"):
            raise ConfigError(f"sparsegpt.percdamp={self.percdamp!r} is not valid: "
                              "must be a number >= 0")


@dataclass
class SparseGPTOutput:
    weight: torch.Tensor  # (out, in) float32, zero where pruned
    mask: torch.Tensor  # (out, in) bool, True = kept
    error: float  # OBS estimate of ||X W_new^T - X W^T||_F^2 (damped Hessian)


def inverse_hessian_factor(gram: torch.Tensor, rows: int, percdamp: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(2 G / rows + lambda I)^-1`` (float64) and the dead inputs."""
    if rows <= 0:
        raise ValueError("sparsegpt: statistics over 0 rows")
    h = gram.to(torch.float64) * (2.0 / rows)  # (in, in)
    dead = torch.diag(h) == 0  # (in,)
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += percdamp * torch.mean(torch.diag(h))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ValueError(f"sparsegpt: the damped Hessian is not positive definite "
                         f"(sparsegpt.percdamp={percdamp}); raise sparsegpt.percdamp")
    hinv = torch.cholesky_inverse(chol)  # (in, in) H^-1
    return torch.linalg.cholesky(hinv, upper=True), dead


def _block_keep(scores: torch.Tensor, start: int, sparsity: float, scope: str) -> torch.Tensor:
    """Unstructured keep-mask of one block (out, B) whose columns start at ``start``.

    Pruned counts use cumulative rounding, so the blocks add up to exactly round(s * numel)
    (scope "layer") or round(s * in) per row (scope "row").
    """
    rows, count = scores.shape
    if scope == "row":
        pruned = round(sparsity * (start + count)) - round(sparsity * start)
        return topk_rows_mask(scores, count - pruned)
    pruned = round(sparsity * rows * (start + count)) - round(sparsity * rows * start)
    return topk_rows_mask(scores.reshape(1, -1), rows * count - pruned).view(rows, count)


def _sweep_block(w1: torch.Tensor, hinv1: torch.Tensor, keep1: torch.Tensor,
                 target: SparsityTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and OBS-update one block ``w1`` (out, B); return (Q1, Err1), both (out, B).

    The sweep runs on the transposed block (B, out), so that column ``i`` is a contiguous
    row and each step is two kernels: ``err = w * (pruned / d_i)`` and the rank-1 update
    of the later columns. After its own update column ``i`` equals ``q`` on kept entries
    (its error is zero there) and is not touched again, so ``Q1 = W1 * keep1`` at the end.
    """
    d = torch.diag(hinv1)  # (B,)
    wt = w1.T.contiguous()  # (B, out)
    errt = torch.empty_like(wt)  # (B, out) scaled errors
    drop = (~keep1).T.to(wt.dtype) / d[:, None]  # (B, out) 1/d_i where pruned, else 0
    n, m = target.n, target.m
    for i in range(wt.shape[0]):
        if m and i % m == 0:
            keep1[:, i:i + m] = select_nm(wt[i:i + m].T ** 2 / d[i:i + m] ** 2, n, m)
            drop[i:i + m] = (~keep1[:, i:i + m]).T.to(wt.dtype) / d[i:i + m, None]
        torch.mul(wt[i], drop[i], out=errt[i])
        wt[i:].addr_(hinv1[i, i:], errt[i], alpha=-1.0)  # rank-1 OBS update of columns i..
    return wt.T * keep1, errt.T


def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, rows: int,
                    target: SparsityTarget, cfg: SparseGPTConfig | None = None,
                    factor: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> SparseGPTOutput:
    """Prune ``weight`` (out, in) to ``target`` and reconstruct it from the Gram ``X^T X``.

    ``factor``: ``inverse_hessian_factor(gram, rows, cfg.percdamp)`` when already known.
    """
    cfg = cfg or SparseGPTConfig()
    _check_target(weight, target, cfg)
    dev = weight.device
    w = weight.detach().to(torch.float32).clone()  # (out, in)
    hinv, dead = factor or inverse_hessian_factor(gram.to(dev), rows, cfg.percdamp)
    hinv = hinv.to(device=dev, dtype=torch.float32)  # (in, in) upper
    dead = dead.to(dev)
    w[:, dead] = 0
    keep = torch.zeros_like(w, dtype=torch.bool)  # (out, in)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    for i1 in range(0, w.shape[1], cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, w.shape[1])
        w1 = w[:, i1:i2].clone()  # (out, B)
        hinv1 = hinv[i1:i2, i1:i2]  # (B, B)
        if target.m:
            keep1 = torch.zeros_like(w1, dtype=torch.bool)  # filled every m columns
        else:
            saliency = w1 ** 2 / torch.diag(hinv1) ** 2  # (out, B)
            keep1 = _block_keep(saliency, i1, target.sparsity, target.scope)
        q1, err1 = _sweep_block(w1, hinv1, keep1, target)
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        loss += (err1.double() ** 2).sum() / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # (out, in - i2) lazy batch update
    return SparseGPTOutput(w, keep, float(loss) * rows)


def _check_target(weight: torch.Tensor, target: SparsityTarget, cfg: SparseGPTConfig) -> None:
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt: expected an (out, in) weight, got {tuple(weight.shape)}")
    if target.m:
        if weight.shape[1] % target.m:
            raise ValueError(f"N:M pattern {target.pattern} needs the input width to be a "
                             f"multiple of {target.m}, got {weight.shape[1]}")
        if cfg.blocksize % target.m:
            raise ValueError(f"sparsegpt.blocksize={cfg.blocksize} must be a multiple of "
                             f"{target.m} for N:M pattern {target.pattern}")
    elif target.scope == "global":
        raise ValueError("sparsegpt selects its mask inside the reconstruction, one layer at a "
                         "time; scope 'global' is not supported (use 'layer' or 'row')")


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor
                         ) -> float:
    """``||X W_new^T - X W^T||_F^2 = sum((dW G) * dW)`` from the Gram ``G = X^T X`` (float64)."""
    delta = (new_weight.detach().double() - weight.detach().double()).to(gram.device)  # (out, in)
    return float(((delta @ gram.double()) * delta).sum())


@register_pruner("sparsegpt", SparseGPTConfig)
class SparseGPTPruner(Pruner):
    """Adaptive-mask OBS pruning with lazy blocked updates; returns mask and new weights."""

    needs = frozenset({"sq_norm", "gram"})
    # the last Gram factorized, with its factor: q/k/v (and gate/up) read one input, so
    # their Grams are equal and the float64 factorizations are done once per block
    _last: tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def prune(self, weight: torch.Tensor, stats: LayerStats | None, target: SparsityTarget
              ) -> PruneResult:
        stats = self.require_gram(stats)
        gram = stats.gram.to(weight.device)
        last = self._last
        if last is not None and last[1] == stats.rows and last[0].shape == gram.shape \
                and last[0].device == gram.device and torch.equal(last[0], gram):
            factor = last[2]
        else:
            factor = inverse_hessian_factor(gram, stats.rows, self.cfg.percdamp)
            self._last = (gram, stats.rows, factor)
        out = sparsegpt_prune(weight, gram, stats.rows, target, self.cfg, factor)
        return PruneResult(out.mask, out.weight.to(weight.dtype))
