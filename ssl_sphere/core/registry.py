"""The method registry: name -> method class. A method module registers itself on import
(``ssl_sphere.methods.register``); ``ssl_sphere.methods`` imports the built-in ones.

It lives in the bottom layer so that the config schema (``ssl_sphere.config``) can type the
``method`` section by the class registered under ``method.name`` without importing any method:
what a method is, the config learns from the registry, never from a list of names.
"""

from __future__ import annotations

from typing import Dict, List

METHODS: Dict[str, type] = {}
_DEFAULT: List[str] = []  # the method a config without method.name gets (the first registered as default)


def register_method(cls: type, default: bool = False) -> type:
    """Register a method class under ``cls.Config.name`` (its config dataclass's default name);
    ``default``: the method of a config that names none."""
    name = cls.Config.name
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is registered already ({METHODS[name].__qualname__})")
    METHODS[name] = cls
    if default and not _DEFAULT:
        _DEFAULT.append(name)
    return cls


def default_method() -> str:
    if _DEFAULT:
        return _DEFAULT[0]
    if METHODS:
        return next(iter(METHODS))
    raise KeyError("no method is registered (import ssl_sphere.methods first)")


def method_names() -> List[str]:
    return list(METHODS)


def method_class(name: str) -> type:
    """The class registered as ``name``; KeyError when there is none (config turns that into a
    ConfigError listing the registered names)."""
    return METHODS[name]
