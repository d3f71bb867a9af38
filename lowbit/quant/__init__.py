"""Quantization: formats, calibrated algorithms, recipes and checkpoints."""
