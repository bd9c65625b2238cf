"""fedprune: federated pruning of CNNs and language models on Flower."""

__version__ = "0.1.0"
