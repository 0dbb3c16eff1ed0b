"""Process start-up: the imports every clipkit command makes (torch, open_clip, timm, transformers) create about a
million long-lived objects, and CPython's cyclic collector walks all of them again each time a generation fills
while they load: about a quarter of a command's import time. Commands import their libraries inside
`paused_collection()`, which holds the collector off while they load and then freezes what they made
(`gc.freeze`: kept out of later collections, as CPython's documentation advises for such start-up objects).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused_collection() -> Iterator[None]:
    """Run the body (imports) with the cyclic garbage collector off; afterwards freeze the objects that exist and
    restore the collector's previous state. Nothing is leaked: reference counting frees everything as usual, and
    frozen objects are the modules and their tables, which live until the process ends anyway."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
