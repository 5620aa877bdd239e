"""What every kernel module needs from Triton, in one place: is it installed, is the interpreter on, and a jit
of the module's kernel functions into a namespace of their own.

Kernel modules define their ``@triton.jit`` bodies as plain functions (importing the module imports no Triton)
and call :func:`jit_namespace` on first use. The namespace binds ``triton``/``tl`` to the real modules of the
mode fixed when Triton was first imported (interpreter or compiler), so the same source serves both.

**Autotuning switch.** The GEMM kernels (scaled_mm, packed_mm, lowbit_gemv) and hadamard_quant's forward are
``triton.autotune``-d over their ``GPU_CONFIGS`` on a GPU, keyed by shape: every new shape benchmarks every config
(compiling each once per set of compile-time constants). The environment
variable ``LOWBIT_AUTOTUNE`` (default ``"1"``, read at each launch) set to ``"0"`` launches them with one fixed
configuration instead, each module's ``DEFAULT_GPU_CONFIG`` (tests: one compile per kernel variant, no
benchmarking); :func:`launch_config` is the one place that decides.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types
from collections.abc import Iterable, Mapping
from typing import Any

#: Environment variable: "0" (or false/no/off) turns the kernels' autotuner off (module docstring).
AUTOTUNE_ENV = "LOWBIT_AUTOTUNE"


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (it must be set before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """Whether ``LOWBIT_AUTOTUNE`` (default "1") lets the kernels autotune on a GPU; read at every launch."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def launch_config(config: Mapping[str, Any] | None, interpret: bool, interpret_config: Mapping[str, Any],
                  default_gpu_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The one configuration a kernel launch uses — a fresh dict the caller may pop from — or None for the
    autotuner: an explicit ``config`` first, ``interpret_config`` under TRITON_INTERPRET=1, ``default_gpu_config``
    when ``LOWBIT_AUTOTUNE=0``; otherwise (a GPU, autotuning on) None."""
    if config is None:
        if interpret:
            config = interpret_config
        elif not autotune_enabled():
            config = default_gpu_config
        else:
            return None
    return dict(config)


def custom_op(name: str, schema: str, impl: Any) -> Any:
    """``impl`` registered as the torch.library op ``lowbit::name`` (no mutated arguments); ``impl`` itself stays a
    plain function, which the public entry points call directly where :func:`direct_call` allows."""
    import torch

    return torch.library.custom_op(f"lowbit::{name}", mutates_args=(), schema=schema)(impl)


def on_device(device: Any) -> Any:
    """Context: make ``device`` the current CUDA device (Triton launches on the current one); a no-op for
    CPU tensors (the interpreter)."""
    import contextlib

    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def resolve_backend(backend: str, device: Any, min_capability: tuple[int, int]) -> str:
    """A GEMM's ``backend="auto"``: the reference on the CPU, the Triton kernel on a CUDA device of at least
    ``min_capability`` with Triton installed, torch's own op on other GPUs; any other value as given."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "ref"
    import torch

    if has_triton() and torch.cuda.get_device_capability(device) >= min_capability:
        return "triton"
    return "torch"


def direct_call(t: Any) -> bool:
    """Whether a public kernel entry point may call its implementation directly instead of through its
    ``torch.library`` custom op: eager (not traced by torch.compile) on a real CUDA tensor. The op exists for
    torch.compile (opaque to it, with a fake implementation for shapes); in eager mode its dispatch is host time
    only — tens of µs per call, and a fused layer makes five such calls per step (docs/results.md §6: the kernel
    path is host-bound). Fake tensors, CPU tensors and traced calls keep the op."""
    import torch

    if not getattr(t, "is_cuda", False) or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


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
