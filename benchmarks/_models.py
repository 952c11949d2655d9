"""The foundation's two networks, as ``hvp_cost.py``, ``eigen.py`` and ``distributed.py``
use them, and float64 references of their curvature products.

* ``mlp``: 64-256-256-10 with tanh, a batch of 1024 (P = 85,002);
* ``cnn``: conv3x3(16, stride 2)-ReLU-conv3x3(32, stride 2)-ReLU-linear(10), a batch of 256
  images of 1x28x28 (P = 16,330);

both float32 with the mean cross-entropy on random inputs and labels (seeded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import hesse


@dataclass
class Problem:
    """A model, its loss, one batch and a direction ``v`` (flat and split like the params)."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor
    params: list[Tensor]
    v: Tensor
    v_list: list[Tensor]


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """The network, the shape of one input and the batch size."""
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )
        return model, (64,), 1024
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 6 * 6, 10),
        )
        return model, (1, 28, 28), 256
    raise ValueError(f"unknown model {name!r}")


def make_problem(name: str, device: torch.device, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    model, shape, n = make_model(name)
    model = model.to(device)
    X = torch.randn(n, *shape, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), device=device)
    v_list = list(hesse.ParamSpace(params).unflatten(v))
    return Problem(name, model, nn.CrossEntropyLoss(), X, y, params, v, v_list)


def float64_problem(pb: Problem) -> Problem:
    """The same problem on a float64 copy of the model (``v_list`` left empty)."""
    model = copy.deepcopy(pb.model).double()
    params = list(model.parameters())
    return Problem(pb.name, model, pb.loss_fn, pb.X.double(), pb.y, params, pb.v.double(), [])


def hesse_operator(pb: Problem, kind: str = "H") -> hesse.CurvatureOperator:
    """hesse's Hessian (``kind="H"``) or GGN of the problem's loss on its batch."""
    op = hesse.HessianOperator if kind == "H" else hesse.GGNOperator
    return op(pb.model, pb.loss_fn, (pb.X, pb.y))


def flat(out: Any) -> Tensor:
    """A product's result as one flat tensor (it may come as a list of tensors)."""
    if isinstance(out, Tensor):
        return out.reshape(-1)
    return torch.cat([t.reshape(-1) for t in out])


def rel_error(out: Any, ref: Tensor) -> float:
    return float((flat(out).detach().double() - ref).norm() / ref.norm())


def references(pb: Problem) -> dict[str, Tensor]:
    """H v and G v in float64 by plain double backward on a copy of the model."""
    model = copy.deepcopy(pb.model).double()
    ps = list(model.parameters())
    X, v = pb.X.double(), [t.double() for t in pb.v_list]
    out = model(X)
    g = torch.autograd.grad(pb.loss_fn(out, pb.y), ps, create_graph=True)
    hv = torch.autograd.grad(g, ps, grad_outputs=v, retain_graph=True)
    # G v = J^T H_out J v; J v by the double-vjp trick (the vjp is linear in u).
    u = torch.zeros_like(out, requires_grad=True)
    jtu = torch.autograd.grad(out, ps, grad_outputs=u, create_graph=True)
    jv = torch.autograd.grad(jtu, u, grad_outputs=v)[0]
    o = out.detach().requires_grad_(True)
    go = torch.autograd.grad(pb.loss_fn(o, pb.y), o, create_graph=True)[0]
    hjv = torch.autograd.grad(go, o, grad_outputs=jv)[0]
    gv = torch.autograd.grad(out, ps, grad_outputs=hjv)
    return {"H": flat(hv), "GGN": flat(gv)}


def plain_hvp(pb: Problem, v: Tensor) -> Tensor:
    """H v by plain double backward (independent of hesse's operators), ``v`` flat."""
    loss = pb.loss_fn(pb.model(pb.X), pb.y)
    g = torch.autograd.grad(loss, pb.params, create_graph=True)
    vs = list(hesse.ParamSpace(pb.params).unflatten(v))
    return flat(torch.autograd.grad(g, pb.params, grad_outputs=vs))
