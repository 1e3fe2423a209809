"""The two Linux prctl calls serving makes, through libc (no-ops where libc has no prctl)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import signal
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_NAME = 15


@functools.cache
def _prctl() -> Callable[..., Any] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name, use_errno=True), "prctl", None) if name else None


def die_with(sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def name_this_thread(name: str) -> None:
    """Name the calling OS thread (15 bytes at most): ``top -H``, ``ps -L`` and /proc show it."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries.

    glibc keeps freed activation buffers in each copy thread's arena (its mmap threshold grows
    with the largest tensor freed), so after the largest shapes ran a server would otherwise hold
    their working set for good: for MiniLM at b32 s128, ~250 MB per copy. The engine trims after
    warm-up and when idle, never between batches under load (that would add page faults).
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)
