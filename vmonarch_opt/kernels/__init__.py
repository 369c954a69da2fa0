"""Attention kernels, one folder per family, each with its Triton kernels (``kernel.py``) beside the
readable pure-PyTorch reference (``reference.py``) and, where the family has one, its layout code
(``layout.py``):

* ``flash/``   dense flash attention (with the row entropy that calibration reads);
* ``monarch/`` Monarch attention (R and L steps on a video grid's blocks);
* ``vmoba/``   VMoBA block-sparse attention (block selection, sparse attention, pooled rest).

References never import kernels. ``dispatch.py`` is the one place that chooses the Triton kernel
or the reference for a call; ``tuning.py`` holds the launch configs each family has tuned.
Import submodules directly; this package imports nothing heavy on its own.
"""
