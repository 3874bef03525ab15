"""Raw Triton kernels, one file per op family. Shipped inside the wheel as ``misa_fast.kernels``.

Kernels import only triton (and torch for launch helpers): the autograd wrappers, torch references
and dispatch live in ``misa_fast.ops``.
"""
