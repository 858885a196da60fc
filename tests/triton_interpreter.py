"""Triton's interpreter without its repeated patching of ``triton.language`` (tests on CPUs only).

Each call of a ``@triton.jit`` helper from inside an interpreted kernel makes Triton's interpreter patch
``triton.language`` again (``_patch_lang``): four passes of ``inspect.getmembers`` over its modules, about a
millisecond per call, for patches the kernel's own launch has already made and which the helper's pass finds
done. Kernels that call helpers in their loops (the attention's dropout, Philox) spent a quarter of their
interpreted time there. ``skip_repeated_language_patches`` makes a pass over a package that a patch still in
effect has covered return at once; a package first patched by a helper's call (whose patches Triton never
restores) is marked as such for good, as it stays patched. Everything the interpreter computes is unchanged.
Where Triton's interpreter is not laid out as expected (another Triton version), nothing is changed.
"""

from __future__ import annotations


def skip_repeated_language_patches() -> bool:
    """Install the shortcut; whether it was installed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_builtin = getattr(interpreter, "_patch_builtin", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch_builtin is None or scope_type is None or not callable(getattr(scope_type, "restore", None)):
        return False
    if getattr(patch_builtin, "skips_repeats", False):
        return True
    # id(package) -> the scope whose patches of it are in effect (packages are modules and classes: they live
    # as long as the process).
    covered: dict[int, object] = {}

    def patch_once(package, builder, scope):
        if id(package) in covered:
            return
        patch_builtin(package, builder, scope)
        covered[id(package)] = scope

    restore = scope_type.restore

    def restore_and_forget(self) -> None:
        for key in [key for key, owner in covered.items() if owner is self]:
            del covered[key]
        restore(self)

    patch_once.skips_repeats = True
    interpreter._patch_builtin = patch_once
    scope_type.restore = restore_and_forget
    return True
