"""Federated methods, one registered unit each (see ``base``): fixed masks, SNIP/SynFlow,
FedTiny, PruneFL, FedDST, polarization gates."""

from ..config import MethodConfig
from .base import (ClientMethod, Method, Outcome, Plan, Query, TrainingHooks,
                   method_class, method_names, register_method)

__all__ = ["ClientMethod", "Method", "MethodConfig", "Outcome", "Plan", "Query",
           "TrainingHooks", "method_class", "method_names", "register_method"]
