"""The wrapper every backend traces: positional tensors in, a tuple of named outputs out.

Kept apart from ``models`` because subclassing ``torch.nn.Module`` needs torch at import time,
and only tracing needs this class.
"""

from __future__ import annotations

from typing import Any

import torch


class PositionalModel(torch.nn.Module):
    """Calls a HF model with positional tensors (in ``input_names`` order) and returns a tuple."""

    def __init__(self, model: Any, input_names: tuple[str, ...], output_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        out = self.model(**kwargs, return_dict=True)
        return tuple(out[name] for name in self.output_names)
