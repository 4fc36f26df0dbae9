"""Offloaded parts (a ``device_map`` sending ``model.vggt`` or ``model.fusion`` to "cpu" or "disk"): accelerate's hook
gives such a module its weights only inside its own ``forward`` (loaded before, given back after). GeoAlign drives VGGT
and the fusion through other methods (VGGT's layer stream; the fusion stream's begin / add / finish), so it fires their
hooks around the whole fusion of a batch, as transformers' ``force_accelerate_hooks`` does around a forward."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def weights_loaded(*modules: nn.Module) -> Iterator[None]:
    """Inside: every submodule of ``modules`` that accelerate hooked (it hooks each module that holds parameters)
    has its weights on its execution device; given back on exit (also on an exception). Modules without a hook are
    untouched. Inside, the submodules' own forwards keep the weights (their hooks' ``offload`` is off until exit);
    nested for the same module, the inner block is a no-op. With autograd on, an offloaded module with trainable
    parameters is a RuntimeError (accelerate would drop their gradients with the weights)."""
    hooked = [(sub, sub._hf_hook) for module in modules for sub in module.modules()
              if getattr(sub, "_hf_hook", None) is not None]
    if torch.is_grad_enabled():
        trained = [sub for sub, hook in hooked if getattr(hook, "offload", False)
                   and any(p.requires_grad for p in sub.parameters(recurse=False))]
        if trained:
            raise RuntimeError(f"{type(trained[0]).__name__} is offloaded (device_map 'cpu' / 'disk') and has "
                               "trainable parameters: their gradients would be dropped with the weights after the "
                               "call. Place it on a device to train it, or run under torch.no_grad()")
    done = []
    try:
        for module, hook in hooked:
            hook.pre_forward(module)
            offload = getattr(hook, "offload", None)  # AlignDevicesHook's; other hooks have none
            done.append((module, hook, offload))
            if offload is not None:
                hook.offload = False  # a submodule's own forward inside must not give its weights back early
        yield
    finally:
        for module, hook, offload in reversed(done):
            if offload is not None:
                hook.offload = offload
            hook.post_forward(module, ())
