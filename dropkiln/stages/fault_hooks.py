"""Fault points inside a model's forward and backward pass, where allocations really fail.

A fault point at a step boundary fires before anything is allocated, so it proves little
about recovery from a real out-of-memory error, which comes from inside a forward, a
backward or a VAE decode, with activations and gradients half built. These hooks put the
point there: at the end of one block's forward (the model's forward is part-way through),
and when the gradient of that block's output is computed (the backward is part-way
through).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor, nn


@contextmanager
def inside(
    module: nn.Module, on_forward: Callable[[], None], on_backward: Callable[[], None] | None = None
) -> Iterator[None]:
    """While the body runs, call ``on_forward`` after each forward of ``module`` and
    ``on_backward`` when the gradient of its output is computed; removed afterwards (the
    module belongs to a warm pipeline that other jobs use)."""

    def forward_hook(_module: nn.Module, _args: object, output: object) -> None:
        on_forward()
        if on_backward is None:
            return
        tensor = _first_tensor(output)
        if tensor is not None and tensor.requires_grad:
            tensor.register_hook(lambda _grad: on_backward())

    handle = module.register_forward_hook(forward_hook)
    try:
        yield
    finally:
        handle.remove()


def middle_block(model: nn.Module) -> nn.Module:
    """A block in the middle of a UNet or a VAE coder (its mid block), else the model."""
    block = getattr(model, "mid_block", None)
    return block if block is not None else model


def _first_tensor(output: object) -> Tensor | None:
    import torch

    if isinstance(output, tuple | list):
        return _first_tensor(output[0]) if output else None
    if hasattr(output, "sample"):
        return _first_tensor(output.sample)
    return output if isinstance(output, torch.Tensor) else None
