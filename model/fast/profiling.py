"""Named regions of a forward pass, for the per-layer profile (``tools/profile_layers.py``).

Modules are named by their place in the network (module hooks); :func:`region` names the parts
of a forward that do not run as a submodule call (the encoder's fused inference path, the
detector's functional steps). Without a listener (:func:`listen`) a region costs one check.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class Listener(Protocol):
    def enter(self, name: str) -> None: ...

    def exit(self, name: str) -> None: ...


_LISTENER: Listener | None = None


@contextmanager
def region(name: str) -> Iterator[None]:
    """Mark the ``with`` block as ``name`` (within the module that runs it)."""
    listener = _LISTENER
    if listener is None:
        yield
        return
    listener.enter(name)
    try:
        yield
    finally:
        listener.exit(name)


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Send the regions entered in the ``with`` block to ``listener``."""
    global _LISTENER
    previous, _LISTENER = _LISTENER, listener
    try:
        yield
    finally:
        _LISTENER = previous
