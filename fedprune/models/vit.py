"""A small vision transformer for 32x32 images (CIFAR-10), trained by fedprune itself.

Patch embedding (4x4 patches: 64 image tokens), a class token, learned position
embeddings, ``depth`` pre-norm blocks, and a linear head on the class token. Width:
``model.width`` x 4 channels (width 16 -> 64; width 48 -> 192, DeiT-Tiny's), heads of 32
channels, MLP ratio 2, depth 6.

Token pruning hooks (``fedprune.prune.tokens``), the only thing that differs from a
textbook ViT: each block keeps the attention probabilities and keys of its last forward
pass (``last_attention``, ``last_keys``, only while ``record`` is on: they cost memory),
and calls its ``reducer`` (if set) between attention and MLP, the place ToMe and
Zero-TPrune change the token set. ``sizes`` (tokens merged into each token) travel with
the sequence; attention adds log(size) to its logits when ``proportional`` is on (ToMe's
proportional attention). Token 0 is the class token.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .registry import register_model

# reducer(block, x, sizes) -> (x, sizes): x (B, N, C), sizes (B, N, 1)
Reducer = Callable[["Block", torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not a multiple of its {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N): row = query
        if sizes is not None:
            logits = logits + sizes.log().view(b, 1, 1, n)
        probs = logits.softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), probs, k


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.reducer: Reducer | None = None
        self.record = False
        self.proportional = False
        self.last_attention: torch.Tensor | None = None
        self.last_keys: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, sizes: torch.Tensor):
        out, probs, keys = self.attn(self.norm1(x), sizes if self.proportional else None)
        x = x + out
        if self.record or self.reducer is not None:
            self.last_attention, self.last_keys = probs, keys
        if self.reducer is not None:
            x, sizes = self.reducer(self, x, sizes)
        if not self.record:
            self.last_attention = self.last_keys = None
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x, sizes


class ViT(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dim: int, depth: int = 6,
                 heads: int | None = None, patch: int = 4, image: int = 32,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if image % patch:
            raise ValueError(f"image size {image} is not a multiple of patch size {patch}")
        heads = heads or max(1, dim // 32)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.dim, self.heads, self.tokens = dim, heads, tokens + 1
        # tokens entering each block in the last forward, then those leaving the last one
        self.last_tokens: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        sizes = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=x.dtype)
        self.last_tokens = []
        for block in self.blocks:
            self.last_tokens.append(x.shape[1])
            x, sizes = block(x, sizes)
        self.last_tokens.append(x.shape[1])
        return self.head(self.norm(x)[:, 0])

    def flops(self, tokens: list[int] | None = None) -> float:
        """Multiply-accumulates x 2 of one image's matrix products (patch embedding,
        attention, MLP, head), given ``last_tokens``: the tokens entering each block and,
        last, those leaving the last block (default: none removed). A block's MLP runs on
        what its reducer left (the next entry). The reducers' own work (WPR iterations,
        similarities, merges) is not counted here: measured images/s include it."""
        tokens = tokens or [self.tokens] * (len(self.blocks) + 1)
        if len(tokens) != len(self.blocks) + 1:
            raise ValueError(f"flops needs {len(self.blocks) + 1} token counts (each block's "
                             f"input and the last block's output), got {len(tokens)}")
        d, total = self.dim, 0.0
        patches = self.tokens - 1
        total += 2 * patches * d * self.patch_embed.in_channels * \
            self.patch_embed.kernel_size[0] * self.patch_embed.kernel_size[1]
        for i, block in enumerate(self.blocks):
            n, after = tokens[i], tokens[i + 1]
            hidden = block.fc1.out_features
            total += 2 * n * d * 3 * d  # qkv
            total += 2 * 2 * n * n * d  # q k^T and probs v
            total += 2 * n * d * d  # proj
            total += 2 * 2 * after * d * hidden  # MLP on the tokens the reducer left
        return total + 2 * d * self.head.out_features


@register_model("vit")
def vit(cfg: ModelConfig, in_channels: int) -> nn.Module:
    return ViT(in_channels, cfg.num_classes, dim=4 * cfg.width)
