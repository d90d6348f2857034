"""Triton kernels, importable as ``relscale.kernels``. They import only torch and triton.

One file per op, Liger-style: Triton kernels, an ``autograd.Function``, a functional wrapper
and an ``nn.Module`` drop-in, each registered as a ``torch.library`` custom op.
"""
