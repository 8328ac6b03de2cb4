"""Kernels of our own for CPUs (C, compiled on first use), beside the MLX graph they stand for."""
