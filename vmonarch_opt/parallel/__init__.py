"""Optimized models under context parallelism (several GPUs on one sequence): docs/multi_gpu.md.

* Ulysses (diffusers ``enable_parallelism(ContextParallelConfig(ulysses_degree=P))``, or a model's
  own all-to-all around its attention): each rank's sites see every token of ``H / P`` heads and
  run their plans unchanged. Optimize then enable works as is; enable then optimize needs
  ``inplace=True`` and calibrates across the ranks (``calibration.py``).
* Ring (``ring_degree=P``): optimize first; the optimized self-attention sites take diffusers'
  sequence split themselves (``guard.py``, ``ring.py``): dense exactly (log-sum-exp merge),
  Monarch frame blocks from gathered R-step factors, other methods as exact dense ring attention
  with the reason counted.
* :func:`process_group`: the group of ranks ``optimize`` must agree across for models that split
  themselves (not diffusers').
"""
from .comm import Comm, process_group
from .ring import SequenceSplit, dense_ring, merge_partials
from .session import Session

__all__ = ["Comm", "process_group", "Session", "SequenceSplit", "dense_ring", "merge_partials"]
