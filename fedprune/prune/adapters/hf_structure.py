"""Structure of Hugging Face transformer blocks: heads and MLP channels as coupled groups.

One layout per family names a block's attention projections and MLP layers:

==========  ==================================================  ===============================
family      attention (query, key, value, output)              MLP (inputs -> output)
==========  ==================================================  ===============================
Llama-like  self_attn.{q,k,v,o}_proj (grouped-query attention)  mlp.{gate,up}_proj -> down_proj
OPT         self_attn.{q,k,v,out}_proj                          fc1 -> fc2
GPT-2       attn.c_attn (fused q|k|v, Conv1D) -> attn.c_proj    mlp.c_fc -> mlp.c_proj
BERT        attention.self.{query,key,value} -> .output.dense   intermediate.dense -> output.dense
==========  ==================================================  ===============================

Heads (``heads="kv"``, the default): one unit = one key/value head with the query heads that
read it (rows of q, k, v; columns of the output projection), so the ratio of query to
key/value heads never changes. ``heads="query"``: one unit = one query head (rows of q,
columns of the output projection), key/value heads all stay, and every key/value head must
keep the same number of query heads (a bucket). Without grouped-query attention both are
the same. MLP: one unit = one intermediate channel (rows of every input layer, one column
of the output layer). The output projections' input columns carry the statistics.

After surgery the per-layer shapes are written into the model: attention modules' head
counts, and the config when every layer has the same shapes and the family's config can
say so (Llama-like: heads, key/value heads, intermediate size, with ``head_dim`` made
explicit; OPT/GPT-2/BERT: intermediate size only, since their head size is derived from the
hidden size). Anything the stock config cannot express is recorded as ``config.fedprune_layers``
(one dict per layer) and the model loads through ``fedprune.prune.structured.load_pruned``.
Hidden-size (embedding-dimension) pruning is not supported: it would touch every layer, the
embeddings and the norms, and no stock config expresses a residual width other than ``hidden_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..structured.groups import GroupSet, Member, contiguous_index
from .base import Block

LAYER_KEYS = ("heads", "kv_heads", "intermediate")


@dataclass(frozen=True)
class Layout:
    """Where one family keeps a block's attention and MLP layers (names inside a block)."""

    family: str
    attn: str  # the attention module holding head counts
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    fused_qkv: bool = False  # GPT-2: q|k|v are thirds of one layer's output
    gqa_config: bool = False  # config can express heads and key/value heads (head_dim explicit)


LAYOUTS = (
    Layout("llama", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
           "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
           gqa_config=True),
    Layout("llama-nogate", "self_attn", "self_attn.q_proj", "self_attn.k_proj",
           "self_attn.v_proj", "self_attn.o_proj", ("mlp.up_proj",), "mlp.down_proj",
           gqa_config=True),
    Layout("opt", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
           "self_attn.out_proj", ("fc1",), "fc2"),
    Layout("gpt2", "attn", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj",
           ("mlp.c_fc",), "mlp.c_proj", fused_qkv=True),
    Layout("bert", "attention.self", "attention.self.query", "attention.self.key",
           "attention.self.value", "attention.output.dense", ("intermediate.dense",),
           "output.dense"),
)


def layout_of(block: Block) -> Layout:
    """The layout whose layers all exist in ``block``; ValueError naming the block if none."""
    names = {n for n, _ in block.module.named_modules()}
    for lay in LAYOUTS:
        if {lay.attn, lay.q, lay.k, lay.v, lay.o, *lay.mlp_in, lay.mlp_out} <= names:
            return lay
    raise ValueError(f"block {block.name!r} ({type(block.module).__name__}): no known "
                     f"attention/MLP layout for structured pruning; known: "
                     f"{[lay.family for lay in LAYOUTS]}")


def head_dim(attn: nn.Module) -> int:
    for name in ("head_dim", "attention_head_size"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    raise ValueError(f"{type(attn).__name__} has no head_dim/attention_head_size attribute")


def _out_features(module: nn.Module) -> int:
    return module.nf if type(module).__name__ == "Conv1D" else module.weight.shape[0]


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]


def layer_shape(block: Block) -> dict[str, int]:
    """Heads, key/value heads and intermediate size of one block, read from its weights."""
    lay, mods = layout_of(block), dict(block.module.named_modules())
    hd = head_dim(mods[lay.attn])
    if lay.fused_qkv:
        heads = _out_features(mods[lay.q]) // (3 * hd)
        kv = heads
    else:
        heads = _out_features(mods[lay.q]) // hd
        kv = _out_features(mods[lay.k]) // hd
    return {"heads": heads, "kv_heads": kv, "intermediate": _out_features(mods[lay.mlp_in[0]])}


def _head_members(block: Block, lay: Layout, heads: int, kv: int, hd: int, mode: str
                  ) -> tuple[int, tuple[Member, ...], int]:
    """Units, members and bucket size of one attention layer's head group set."""
    rep = heads // kv
    q = block.qualify(lay.q)
    o = block.qualify(lay.o)
    if lay.fused_qkv:  # q|k|v thirds of c_attn's outputs; no GQA in GPT-2
        width = heads * hd
        index = torch.cat([contiguous_index(heads, hd, off * width) for off in range(3)], dim=1)
        return heads, (Member(q, "out", index), Member(o, "in", contiguous_index(heads, hd),
                                                        stats=True)), 0
    if mode == "query" and rep > 1:
        return heads, (Member(q, "out", contiguous_index(heads, hd)),
                       Member(o, "in", contiguous_index(heads, hd), stats=True)), rep
    return kv, (Member(q, "out", contiguous_index(kv, rep * hd)),
                Member(block.qualify(lay.k), "out", contiguous_index(kv, hd)),
                Member(block.qualify(lay.v), "out", contiguous_index(kv, hd)),
                Member(o, "in", contiguous_index(kv, rep * hd), stats=True)), 0


def block_groups(block: Block, heads_mode: str = "kv") -> list[GroupSet]:
    """The head and MLP group sets of one transformer block."""
    if heads_mode not in ("kv", "query"):
        raise ValueError(f"heads={heads_mode!r}: choose 'kv' (a key/value head with its query "
                         "heads) or 'query' (query heads, key/value heads kept)")
    lay, mods = layout_of(block), dict(block.module.named_modules())
    shape, hd = layer_shape(block), head_dim(mods[lay.attn])
    units, members, bucket = _head_members(block, lay, shape["heads"], shape["kv_heads"], hd,
                                           heads_mode)
    gqa = shape["kv_heads"] < shape["heads"]
    label = "query head" if bucket else "key/value head" if gqa else "head"
    attn = GroupSet(f"{block.qualify(lay.attn)}:heads", "attn", block.index, units, members,
                    bucket, label)
    inter = shape["intermediate"]
    mlp_members = tuple(Member(block.qualify(n), "out", contiguous_index(inter, 1))
                        for n in lay.mlp_in)
    mlp_members += (Member(block.qualify(lay.mlp_out), "in", contiguous_index(inter, 1),
                           stats=True),)
    mlp = GroupSet(f"{block.qualify(lay.mlp_out)}:channels", "mlp", block.index, inter,
                   mlp_members, 0, "intermediate channel")
    return [attn, mlp]


def set_block_attrs_(block: Block) -> None:
    """Write a block's head counts (read from its weights) into its attention module."""
    lay, mods = layout_of(block), dict(block.module.named_modules())
    attn, shape = mods[lay.attn], layer_shape(block)
    hd = head_dim(attn)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = shape["heads"] // shape["kv_heads"]
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, shape["heads"])
    if hasattr(attn, "all_head_size"):
        attn.all_head_size = shape["heads"] * hd
    if hasattr(attn, "split_size"):
        attn.split_size = shape["heads"] * hd
    for name in lay.mlp_in[:1]:
        parent = mods[name.rsplit(".", 1)[0]] if "." in name else block.module
        if hasattr(parent, "intermediate_size"):
            parent.intermediate_size = shape["intermediate"]


_CONFIG_KEYS = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}
_INTER_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


def write_config_(config, blocks: list[Block]) -> None:
    """Record the blocks' shapes in ``config``: stock keys where they can say it, else
    ``config.fedprune_layers`` (see the module docstring)."""
    shapes = [layer_shape(b) for b in blocks]
    lay = layout_of(blocks[0])
    uniform = all(s == shapes[0] for s in shapes)
    expressible = uniform
    if uniform:
        s = shapes[0]
        inter_key = next((k for k in _INTER_KEYS if hasattr(config, k)), None)
        if inter_key is None:
            expressible = False
        else:
            setattr(config, inter_key, s["intermediate"])
        if lay.gqa_config:
            config.head_dim = head_dim(blocks[0].module.get_submodule(lay.attn))
            config.num_attention_heads = s["heads"]
            config.num_key_value_heads = s["kv_heads"]
        elif s["heads"] != _config_heads(config):
            expressible = False
    if expressible:
        if hasattr(config, "fedprune_layers"):
            del config.fedprune_layers
    else:
        config.fedprune_layers = shapes


def _config_heads(config) -> int:
    return int(getattr(config, "num_attention_heads", getattr(config, "n_head", 0)))


def drop_blocks_(model: nn.Module, path: str, keep: list[int]) -> None:
    """Keep only the blocks ``keep`` (in order) of the ModuleList at ``path``; renumber the
    layer indices that key/value caches use and update the layer count in the config."""
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_by_inverse_layer_idx=True scales attention by the layer's "
                         "position: removing blocks would change the remaining blocks")
    stack = model.get_submodule(path)
    kept = [stack[i] for i in keep]
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.ModuleList(kept))
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(kept))
    for key in ("layer_types", "fedprune_layers"):
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(stack):
            setattr(config, key, [values[i] for i in keep])


_BIAS_FLAGS = ("attention_bias", "mlp_bias", "enable_bias")


@torch.no_grad()
def enable_biases_(model: nn.Module, blocks: list[Block]) -> None:
    """Zero biases on every attention and MLP layer that lacks one, with the config flags
    that make stock transformers build them (Llama: ``attention_bias``, ``mlp_bias``), so a
    model with compensated biases still loads with plain ``from_pretrained``."""
    for block in blocks:
        lay = layout_of(block)
        for name in dict.fromkeys((lay.q, lay.k, lay.v, lay.o, *lay.mlp_in, lay.mlp_out)):
            module = block.module.get_submodule(name)
            if getattr(module, "bias", None) is None:
                w = module.weight
                module.bias = nn.Parameter(torch.zeros(_out_features(module), dtype=w.dtype,
                                                       device=w.device))
    for key in _BIAS_FLAGS:
        if hasattr(model.config, key):
            setattr(model.config, key, True)
    if not _stock_builds_biases(model, blocks):
        model.config.fedprune_biases = True  # e.g. Qwen2's o_proj: loads via load_pruned


def _stock_builds_biases(model: nn.Module, blocks: list[Block]) -> bool:
    """Whether stock transformers, from this config, builds every bias the model now has
    (Qwen2, Mistral, Gemma hard-code some projections without one, whatever the flags)."""
    with torch.device("meta"):
        stock = type(model)(model.config)
    mods = dict(stock.named_modules())
    for block in blocks:
        for name, module in block.module.named_modules():
            if getattr(module, "bias", None) is None or not hasattr(module, "weight"):
                continue
            if getattr(mods.get(block.qualify(name)), "bias", None) is None:
                return False
    return True
