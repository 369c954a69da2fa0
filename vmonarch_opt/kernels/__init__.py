"""Attention kernels (Triton) and their pure-PyTorch references.

Import the submodules directly (``from vmonarch_opt.kernels.monarch_reference import ...``); this
package imports nothing heavy on its own.
"""
