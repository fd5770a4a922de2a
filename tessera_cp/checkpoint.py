"""Activation checkpointing: keep a block's inputs only and recompute its forward during backward.

``@checkpoint`` wraps a function; ``checkpoint(fn, *args)`` calls one; ``checkpoint_region()`` is a context for a
block of code. All three record the ops inside as replayable nodes (see ``autograd``): gradients are identical to
the plain run as long as the block is deterministic (draw dropout masks outside, or pass them in).
"""
import functools

from .autograd import checkpoint_region


def checkpoint(fn, *args, **kwargs):
    """``@checkpoint`` on a function, or ``checkpoint(fn, *args, **kwargs)`` to call one checkpointed."""
    if args or kwargs:
        with checkpoint_region():
            return fn(*args, **kwargs)

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with checkpoint_region():
            return fn(*a, **kw)
    return wrapper


__all__ = ["checkpoint", "checkpoint_region"]
