"""Fused Triton kernels of sambayes, one file per phase (installed as ``sambayes.kernels``).

Each file holds the phase's private ``@triton.jit`` block function and kernel, then the
plain launcher its backend calls (:mod:`sambayes.backends.triton`); ``_multi_tensor``
holds what they share: the table of addresses, the full/masked block split, the launch.
"""
