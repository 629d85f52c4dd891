"""Fused Triton kernels of sambayes, one file per phase (installed as ``sambayes.kernels``)."""
