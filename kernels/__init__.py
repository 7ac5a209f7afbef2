"""Triton kernels, each with a shape-checking wrapper and a pure-torch reference (GPU issue)."""
