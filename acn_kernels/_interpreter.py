"""Triton's interpreter (TRITON_INTERPRET=1, how the kernels run on a CPU) without its repeated patching.

Every call of a jit helper inside an interpreted kernel patches the modules of triton.language for the
interpreter again (inspect.getmembers over each: about a millisecond a call, a third of an interpreted
training step, since the row kernels are built from small helpers), although the launch patched them
already and restores them only when it ends. `skip_repeated_patches()` lets each launch patch a module
once, the first time any function of it is called (the kernel's own modules at the launch, the
standard library's `core` at its first call): the same attributes are set as before, so the
interpreter computes exactly what it did. Where Triton's interpreter is not built this way (a version
without `_patch_lang` or `GridExecutor`), nothing is changed.
"""
from __future__ import annotations

import functools
import inspect


def skip_repeated_patches() -> bool:
    """Installs the skip (once); True where this Triton's interpreter takes it."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if patch is None or executor is None or not hasattr(interpreter, "_LangPatchScope"):
        return False
    if getattr(patch, "skips_repeats", False):
        return True
    launch = {"running": False, "patched": frozenset()}
    modules_of: dict = {}  # function -> the triton.language modules its globals hold, which a patch patches

    @functools.wraps(patch)
    def patch_once_per_launch(fn):
        modules = modules_of.get(fn)
        if modules is None:
            modules = modules_of[fn] = frozenset(
                id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        if launch["running"] and modules <= launch["patched"]:
            return interpreter._LangPatchScope()  # nothing to restore: the launch's own scope restores
        if launch["running"]:
            launch["patched"] |= modules
        return patch(fn)

    run = executor.__call__

    @functools.wraps(run)
    def run_launch(self, *args, **kwargs):
        launch["running"], launch["patched"] = True, frozenset()
        try:
            return run(self, *args, **kwargs)
        finally:
            launch["running"], launch["patched"] = False, frozenset()

    patch_once_per_launch.skips_repeats = True
    interpreter._patch_lang, executor.__call__ = patch_once_per_launch, run_launch
    return True
