"""Backends, their kinds and how one is chosen. See ``base.Backend`` for the protocol and
``kinds.BackendKind`` for what each kind is."""

from __future__ import annotations

from neuronserve.backends.base import ArrayModel, Backend, BackendError, CoreSet, LoadedModel
from neuronserve.backends.kinds import BACKENDS, MAX_COPIES, BackendKind, choose_backend, parse_kind

__all__ = [
    "BACKENDS",
    "MAX_COPIES",
    "ArrayModel",
    "Backend",
    "BackendError",
    "BackendKind",
    "CoreSet",
    "LoadedModel",
    "choose_backend",
    "parse_kind",
]
