"""The method registry: the one place that maps a method name or config to its :class:`Method`."""
from __future__ import annotations

from typing import Iterable, Optional

from .base import Method

__all__ = ["ORIGINAL", "is_original", "register", "unregister", "get", "find", "names", "of", "parse", "default_methods",
           "config_to_dict", "config_from_dict", "describe", "check_methods"]

_METHODS: dict[str, Method] = {}
#: a plan's method when the site keeps the model's own attention (no registered method)
ORIGINAL = "original"
_RESERVED = (ORIGINAL,)


def register(method: Method) -> Method:
    """Make ``method`` available to ``optimize``, calibration, profiles, reports and export."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method instance, got {type(method).__name__}")
    name = method.name
    if not name or not isinstance(name, str) or name in _RESERVED:
        raise ValueError(f"a method needs a name other than {_RESERVED}, got {name!r}")
    have = _METHODS.get(name)
    if have is not None and type(have) is not type(method):
        raise ValueError(f"method {name!r} is already registered ({type(have).__name__})")
    if any(m.config_cls is method.config_cls and m.name != name for m in _METHODS.values()):
        raise ValueError(f"config class {method.config_cls.__name__} already belongs to another method")
    _METHODS[name] = method
    return method


def is_original(name: str) -> bool:
    """``name`` says the site keeps the model's own attention."""
    return name == ORIGINAL


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def names() -> tuple:
    """Registered method names, in registration order."""
    return tuple(_METHODS)


def find(name) -> Optional[Method]:
    return _METHODS.get(name) if isinstance(name, str) else None


def get(name: str) -> Method:
    m = find(name)
    if m is None:
        raise ValueError(f"unknown method {name!r}: use one of {names()} or a config object "
                         f"({', '.join(x.config_cls.__name__ for x in _METHODS.values())})")
    return m


def of(cfg) -> Method:
    """The method a config object belongs to."""
    for m in _METHODS.values():
        if type(cfg) is m.config_cls:
            return m
    raise ValueError(f"{cfg!r} is not the config of a registered method ({names()})")


def parse(spec):
    """A method name or a config object -> a config object."""
    if isinstance(spec, str):
        return get(spec).config()
    of(spec)  # raises for anything that is not a registered method's config
    return spec


def default_methods() -> tuple:
    """What ``optimize(methods=None)`` allows: every registered method that is not ``opt_in``."""
    return tuple(n for n, m in _METHODS.items() if not m.opt_in)


def check_methods(methods) -> tuple:
    """``methods=`` as a tuple of registered names (raises naming the choices otherwise)."""
    if methods is None:
        return default_methods()
    if isinstance(methods, str):
        methods = (methods,)
    try:
        methods = tuple(methods)
    except TypeError:
        methods = ()
    bad = [m for m in methods if find(m) is None]
    if bad or not methods:
        raise ValueError(f"methods={methods!r}: choose a non-empty subset of {names()}")
    return methods


def config_to_dict(cfg) -> dict:
    """A config (or method name) as JSON: ``{"method": ..., **fields}``."""
    cfg = parse(cfg)
    return of(cfg).config_to_dict(cfg)


def config_from_dict(d: dict, strict: bool = False):
    """A saved config; ``strict``: every parameter of its method must be there."""
    m = find(d.get("method"))
    if m is None:
        raise ValueError(f"unknown method {d.get('method')!r} in a saved config (registered: {names()})")
    return m.config_from_dict(d, strict=strict)


def describe(cfg) -> str:
    """Short human label: ``monarch 1×30×52 s1``, ``vmoba 3d thr0.25``, ``dense``."""
    cfg = parse(cfg)
    return of(cfg).describe(cfg)


def ranked(allowed: Iterable[str]) -> list[Method]:
    """The allowed methods that have a default rank, most preferred first."""
    ms = [get(n) for n in allowed if get(n).default_rank is not None]
    return sorted(ms, key=lambda m: m.default_rank)
