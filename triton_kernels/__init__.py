"""Triton kernels, one module per op. Installed as bisenet_fast.triton_kernels; nothing
here knows about models."""
