"""Attention methods, one module each, registered with the method registry.

``monarch`` (Monarch attention on the video grid), ``vmoba`` (block-sparse VMoBA), ``dense``
(exact, through our op) and ``monarch_rt`` (MonarchRT's per-tile Monarch factorisation; opt-in:
only when ``methods=`` names it). A new method is one more module: a config dataclass, a :class:`Method`
subclass implementing its hooks, and a ``register(...)`` call (see ``base.py``).
"""
from .base import Method, Shape
from .registry import (check_methods, config_from_dict, config_to_dict, default_methods, describe, find, get,
                       names, of, parse, ranked, register, unregister)
from . import monarch, vmoba, dense, monarch_rt  # noqa: F401,E402,I001  (registers the built-in methods, in this order)
from .dense import DenseConfig
from .monarch import MonarchConfig
from .monarch_rt import MonarchRTConfig
from .vmoba import VMoBAConfig

__all__ = ["Method", "Shape", "register", "unregister", "get", "find", "names", "of", "parse", "ranked",
           "default_methods", "check_methods", "config_to_dict", "config_from_dict", "describe",
           "MonarchConfig", "VMoBAConfig", "DenseConfig", "MonarchRTConfig"]
