"""Token pruning and merging for transformers (no weights change): Zero-TPrune, ToMe and a
random-drop control, as registered units installed through the model family's adapter."""

from .methods import (RandomDrop, TokenPruner, ToMe, ZeroTPrune, bipartite_merge,
                      gather_tokens, register_token_pruner, schedule_pruner, token_pruner,
                      token_pruners)
from .wpr import combine_heads, iterations_for, weighted_pagerank

__all__ = ["RandomDrop", "ToMe", "TokenPruner", "ZeroTPrune", "bipartite_merge",
           "combine_heads", "gather_tokens", "iterations_for", "register_token_pruner",
           "schedule_pruner", "token_pruner", "token_pruners", "weighted_pagerank"]
