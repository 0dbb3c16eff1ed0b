"""What every clipkit command line shares: the flag meanings of docs/cli.md and the old spellings kept for one
release. A leaf module (argparse and os only), so that any command's module may use it."""
from __future__ import annotations

import argparse
import os
import sys

RELEASE = "the next release"  # when the deprecated spellings below go away


def deprecation_notice(old: str, new: str) -> None:
    """The one line a deprecated spelling prints, on stderr, naming the spelling to use instead."""
    print(f"clipkit: {old} is deprecated and goes away in {RELEASE}; use {new}", file=sys.stderr)


def _action_class(container, action):
    """The class behind an add_argument `action=` ("store", "store_true", "append", ... or a class)."""
    return container._registry_get("action", action, action) if isinstance(action, str) else action


def renamed(container, new: str, old: str, **kwargs) -> argparse.Action:
    """`container.add_argument(new, **kwargs)` that also accepts `old` for one release, with a notice. Help,
    usage and error messages show `new` only; `action.old_spellings` lists the old spellings."""
    base = _action_class(container, kwargs.pop("action", "store"))

    class Renamed(base):
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string == old:
                deprecation_notice(old, new)
            super().__call__(parser, namespace, values, new)

    action = container.add_argument(new, old, action=Renamed, **kwargs)
    action.option_strings = [new]  # the parser still maps `old` to this action; help shows the new name only
    action.old_spellings = (old,)
    return action


def deprecated(container, old: str, new: str, **kwargs) -> argparse.Action:
    """A hidden flag `old` whose meaning moved to another form (`new`, e.g. positional key=value): it prints
    the notice and stores as `kwargs` say; the command folds its value into the new form."""
    base = _action_class(container, kwargs.pop("action", "store"))

    class Deprecated(base):
        def __call__(self, parser, namespace, values, option_string=None):
            deprecation_notice(old, new)
            super().__call__(parser, namespace, values, option_string)

    action = container.add_argument(old, action=Deprecated, help=argparse.SUPPRESS, **kwargs)
    action.replaced_by = new
    return action


def default_threads(ranks: int = 1, workers: int = 0) -> int:
    """`--threads` left out: the cores this process may use, divided among the ranks that run the measured code
    at once (only bench loss runs several), less the loader workers that run beside each (bench embed, bench
    train), at least 1: the measured processes never ask for more cores than there are."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, ranks) - workers)


THREADS_HELP = ("torch threads of each measured process (default: the cores this process may use, divided among "
                "the ranks that run at once, less the loader workers beside each)")
