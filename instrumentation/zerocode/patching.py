"""How every zerocode hook changes a framework from outside: one method of a class replaced by a wrapper, once.

A hook may run twice in one process (an app that calls an instrumentor itself, a test); a second wrapper around
the first would do the hook's work twice per call. The wrapper carries a flag of its hook, so each hook wraps a
method at most once, while different hooks may wrap the same method.
"""

from __future__ import annotations

import functools


def wrap_once(owner: type, name: str, flag: str, make_wrapper) -> bool:
    """Replace ``owner.name`` by ``make_wrapper(original)`` (with the original's name and docstring) and mark it
    with ``flag``; False, and nothing changed, when the method carries ``flag`` already."""
    original = getattr(owner, name)
    if getattr(original, flag, False):
        return False
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, flag, True)
    setattr(owner, name, wrapper)
    return True
