"""The context every second-order pass of hesse runs in.

A Hessian-vector product differentiates a backward pass. Some of PyTorch's fused kernels
have a backward without a derivative of its own:

* the flash and memory-efficient kernels of
  :func:`torch.nn.functional.scaled_dot_product_attention` (used by
  ``nn.MultiheadAttention``, ``nn.TransformerEncoder`` and every Hugging Face transformer
  built with ``attn_implementation="sdpa"``): ``derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``;
* cuDNN's RNN kernels on CUDA (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): their backward has no
  double backward.

Inside :func:`second_order`, attention runs on the math kernel (plain matmuls and a
softmax, differentiable any number of times) and, for a model holding an RNN on a CUDA
device, cuDNN is off, so autograd records operations whose backward is differentiable. The
user's own choices are restored on exit. The cost: the math kernel materialises the
attention matrix, memory quadratic in the sequence length per head (the fused kernels are
linear), and non-cuDNN RNNs are slower. Second derivatives need those intermediates
anyway; ``benchmarks/transformer_hvp.py`` measures the difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def _rnn_without_cudnn() -> Callable[[], None]:
    """Global forward hooks that turn cuDNN off for the forward pass of every RNN module on
    a CUDA device (and back on after it); returns the function that removes them. Other
    modules (convolutions) keep cuDNN."""
    saved: list[bool] = []

    def before(module: nn.Module, args: object) -> None:
        if isinstance(module, nn.RNNBase) and any(p.is_cuda for p in module.parameters()):
            saved.append(torch.backends.cudnn.enabled)
            torch.backends.cudnn.enabled = False

    def after(module: nn.Module, args: object, out: object) -> None:
        if isinstance(module, nn.RNNBase) and saved:
            torch.backends.cudnn.enabled = saved.pop()

    handles = [
        nn.modules.module.register_module_forward_pre_hook(before),
        nn.modules.module.register_module_forward_hook(after),
    ]
    return lambda: [h.remove() for h in handles]


def holds_cuda_rnn(model: nn.Module) -> bool:
    """Whether ``model`` holds an RNN module with parameters on a CUDA device."""
    return any(
        isinstance(m, nn.RNNBase) and any(p.is_cuda for p in m.parameters())
        for m in model.modules()
    )


@contextlib.contextmanager
def second_order(cuda_rnn: bool | None = None) -> Iterator[None]:
    """Run forward passes whose graphs can be differentiated twice.

    Attention (``scaled_dot_product_attention``) uses the math kernel; RNN modules on CUDA
    run without cuDNN (through global forward hooks, installed only if ``cuda_rnn`` is
    ``True``, or ``None`` — not known — and CUDA is available; a caller that knows its model
    passes :func:`holds_cuda_rnn`, so that other models' module calls pay nothing). The
    previous settings are restored on exit. hesse enters this
    context itself around every forward pass it differentiates twice (operator products,
    ``linearize()``, the closures of second-order optimizers, ``hesse.hvp`` and friends,
    ``minimize``); users need it only for their own double-backward code.

    Example:
        >>> mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        >>> x = torch.randn(1, 3, 4)
        >>> with second_order():
        ...     y = mha(x, x, x, need_weights=False)[0].square().sum()
        >>> g = torch.autograd.grad(y, mha.in_proj_weight, create_graph=True)[0]
        >>> torch.autograd.grad(g.sum(), mha.in_proj_weight)[0].shape
        torch.Size([12, 4])
    """
    cudnn = torch.backends.cudnn.enabled
    hooks = torch.cuda.is_available() if cuda_rnn is None else cuda_rnn
    remove = _rnn_without_cudnn() if hooks else None
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if remove is not None:
            remove()
            torch.backends.cudnn.enabled = cudnn
