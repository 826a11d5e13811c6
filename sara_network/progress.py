"""Optional progress bars for long loops: tqdm when it is installed and stderr is a terminal.

The library's loops take a `progress` hook (items, desc=, unit=) -> items; `no_progress` is the
silent default and `progress_bars()` the terminal one (the CLI, and the selection on big models).
"""
from __future__ import annotations

from typing import Callable, Iterable

Progress = Callable[..., Iterable]


def no_progress(items: Iterable, **_: object) -> Iterable:
    return items


def progress_bars(quiet: bool = False, delay: float = 1.0) -> Progress:
    """A hook drawing a tqdm bar that appears only once a loop has run `delay` seconds (so fast runs
    stay quiet); silent when `quiet`, when stderr is not a terminal, or without tqdm."""
    def progress(items: Iterable, **kwargs) -> Iterable:
        if quiet:
            return items
        try:
            from tqdm import tqdm
        except ImportError:
            return items
        return tqdm(items, disable=None, delay=delay, **kwargs)

    return progress
