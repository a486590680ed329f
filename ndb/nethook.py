"""Small helpers to read and rewrite what flows through a module, by hooks.

Every helper is a context manager that removes its hook on exit, so a failed forward
never leaves a model altered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once everything needed has been captured."""


@contextmanager
def capture_input(module: nn.Module, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the first positional input of ``module`` into ``box['x']``."""
    box: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        box["x"] = args[0] if args else next(iter(kwargs.values()))
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def capture_output(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the (first) output of ``module`` into ``box['x']``."""
    box: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        box["x"] = output[0] if isinstance(output, tuple) else output

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def replace_input(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """Feed ``value`` to ``module`` as its first (hidden-states) input."""

    def hook(_module, args, kwargs):
        if args:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the output of ``module`` (a tensor-valued module) by ``fn(output)``."""
    handle = module.register_forward_hook(lambda _m, _a, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def autocast_inside(modules: list[nn.Module], device_type: str, dtype: torch.dtype
                    ) -> Iterator[None]:
    """Run each of ``modules`` under ``torch.autocast(device_type, dtype)``, and nothing
    else: the autocast region opens as a module's forward starts and closes as it ends."""
    regions: list[torch.autocast] = []

    def enter(_module, _args):
        regions.append(torch.autocast(device_type, dtype=dtype))
        regions[-1].__enter__()

    def leave(_module, _args, _output):
        regions.pop().__exit__(None, None, None)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter),
                                            m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while regions:  # a forward that failed inside a module
            regions.pop().__exit__(None, None, None)


@contextmanager
def truncated(layers: nn.ModuleList, start: int) -> Iterator[None]:
    """Run only ``layers[start:]``: the layers below are skipped while inside."""
    kept = list(layers)
    layers._modules = {str(i): m for i, m in enumerate(kept[start:])}
    try:
        yield
    finally:
        layers._modules = {str(i): m for i, m in enumerate(kept)}


def run_until(model: nn.Module, module: nn.Module, **inputs) -> torch.Tensor:
    """Run ``model`` until ``module`` is reached and return that module's input."""
    with capture_input(module, stop=True) as box:
        try:
            model(**inputs)
        except StopForward:
            pass
    return box["x"]
