"""Flower-free federated logic: aggregation and run records."""
