"""Generated functions as PyTorch custom operators (torch.library), so torch.compile and torch.export
see one opaque op per kernel launch sequence instead of a Python autograd.Function.

Every generated module registers two ops in the `attnc` namespace, named after its spec and the hash
of the spec text: `attnc::<spec>_<hash>` (the forward: o and the per-row array the backward reads)
and `attnc::<spec>_<hash>_backward` (dq, dk, dv and the gradients of the spec's differentiable tensor
inputs). Schemas are fixed per spec (tensors, floats, ints), written by the generator.

Registration is idempotent: a module imported twice (the module cache may) registers nothing new;
the ops dispatch to the implementation registered last, which is the same spec compiled the same way.
"""

from __future__ import annotations

import torch

NAMESPACE = "attnc"

_library = None  # one torch.library.Library fragment for every generated module in this process
_impls: dict = {}  # op name -> Implementation (the latest import of a module wins)


class Implementation:
    """What one generated module gives its ops: real and fake forward and backward, and the autograd
    glue (setup_context and the backward formula, which calls the backward op)."""

    def __init__(self, forward, backward, fake_forward, fake_backward, setup_context, autograd_backward):
        self.forward = forward
        self.backward = backward
        self.fake_forward = fake_forward
        self.fake_backward = fake_backward
        self.setup_context = setup_context
        self.autograd_backward = autograd_backward


def _lib():
    global _library
    if _library is None:
        _library = torch.library.Library(NAMESPACE, "FRAGMENT")
    return _library


def _defined(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register(name: str, forward_schema: str, backward_schema: str, impl: Implementation):
    """Define (once per process) `attnc::name` and `attnc::name_backward` with these schemas (argument
    lists and returns, e.g. "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"), point
    them at `impl`, and return the two OpOverloads (forward, backward)."""
    backward_name = f"{name}_backward"
    _impls[name] = impl
    if not _defined(name):
        lib = _lib()
        lib.define(f"{name}{forward_schema}")
        lib.define(f"{backward_name}{backward_schema}")
        qual, backward_qual = f"{NAMESPACE}::{name}", f"{NAMESPACE}::{backward_name}"
        # trampolines: each call looks the implementation up, so a re-imported module takes over
        lib.impl(name, lambda *args: _impls[name].forward(*args), "CompositeExplicitAutograd")
        lib.impl(backward_name, lambda *args: _impls[name].backward(*args), "CompositeExplicitAutograd")
        torch.library.register_fake(qual, lambda *args: _impls[name].fake_forward(*args), lib=lib)
        torch.library.register_fake(backward_qual, lambda *args: _impls[name].fake_backward(*args), lib=lib)
        torch.library.register_autograd(
            qual, lambda ctx, *grads: _impls[name].autograd_backward(ctx, *grads),
            setup_context=lambda ctx, inputs, output: _impls[name].setup_context(ctx, inputs, output), lib=lib)
    namespace = getattr(torch.ops, NAMESPACE)
    return getattr(namespace, name).default, getattr(namespace, backward_name).default
