"""What every kernel module needs from Triton, in one place: is it installed, is the interpreter on, and a jit
of the module's kernel functions into a namespace of their own.

Kernel modules define their ``@triton.jit`` bodies as plain functions (importing the module imports no Triton)
and call :func:`jit_namespace` on first use. The namespace binds ``triton``/``tl`` to the real modules of the
mode fixed when Triton was first imported (interpreter or compiler), so the same source serves both.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types
from collections.abc import Iterable, Mapping
from typing import Any


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (it must be set before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def has_triton() -> bool:
    """Whether Triton is installed (``pip install 'lowbit[triton]'``)."""
    return importlib.util.find_spec("triton") is not None


def jit_namespace(module_globals: Mapping[str, Any], names: Iterable[str], extra: Mapping[str, Any] | None = None,
                  nospec: Mapping[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """Copies of the functions ``names`` of a module, each ``triton.jit``-ed, whose globals are the module's plus
    ``extra`` (``triton``, ``tl``, constants) plus each other: calls between kernel functions resolve to the
    jitted copies. ``nospec[name]`` lists runtime integers not to specialise."""
    import triton

    ns = dict(module_globals, **(extra or {}))
    nospec = nospec or {}
    for name in names:
        fn = module_globals[name]
        clone = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
        clone.__qualname__, clone.__module__, clone.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        clone.__annotations__ = dict(fn.__annotations__)
        ns[name] = triton.jit(clone, do_not_specialize=tuple(nospec.get(name, ())))
    return ns
