"""Pruner core for CNNs and LLMs: adapters, calibration, methods, selection, apply."""
