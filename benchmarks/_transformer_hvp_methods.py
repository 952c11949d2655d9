"""The problem and the methods of ``transformer_hvp.py`` (which describes the method): a
tiny Hugging Face GPT-2 on a batch of random token sequences, its float64 reference
product, and each method as a factory that does its set-up and returns the call to time.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesse
from _harness import Call
from _models import flat

BATCH = 8

warnings.filterwarnings("ignore", message=".*token_id must be.*")


# -- the problem ----------------------------------------------------------------------------


def make_model(n_positions: int, device: torch.device) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=256,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).to(device).eval()


def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy (the labels are the inputs shifted by one)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@dataclass
class Problem:
    model: nn.Module
    batch: dict[str, Tensor]  # {"input_ids", "labels"}: what hesse gets
    params: list[Tensor]
    v: Tensor
    v_list: list[Tensor]

    def loss(self) -> Tensor:
        return loss_fn(self.model(input_ids=self.batch["input_ids"]).logits, self.batch["labels"])


def make_problem(seq: int, device: torch.device, n_positions: int = 128, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    model = make_model(max(n_positions, seq), device)
    tokens = torch.randint(0, 256, (BATCH, seq + 1), device=device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    params = [p for p in model.parameters() if p.requires_grad]  # the tied weight once
    v = torch.randn(sum(p.numel() for p in params), device=device)
    return Problem(model, batch, params, v, list(hesse.ParamSpace(params).unflatten(v)))


def reference(pb: Problem) -> Tensor:
    """H v in float64 by plain double backward (math kernel) on a copy of the model."""
    model = copy.deepcopy(pb.model).double()
    ps = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        logits = model(input_ids=pb.batch["input_ids"]).logits
        g = torch.autograd.grad(loss_fn(logits, pb.batch["labels"]), ps, create_graph=True)
        return flat(torch.autograd.grad(g, ps, [t.double() for t in pb.v_list]))


# -- methods: each factory does the set-up and returns the call to time ----------------------


def first_order(pb: Problem) -> Call:
    return lambda: torch.autograd.grad(pb.loss(), pb.params)


def first_order_math(pb: Problem) -> Call:
    def call() -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.grad(pb.loss(), pb.params)

    return call


def plain_hvp(pb: Problem) -> Call:
    def call() -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            g = torch.autograd.grad(pb.loss(), pb.params, create_graph=True)
            return torch.autograd.grad(g, pb.params, grad_outputs=pb.v_list)

    return call


def plain_hvp_cached(pb: Problem) -> Call:
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(pb.loss(), pb.params, create_graph=True)
    return lambda: torch.autograd.grad(g, pb.params, grad_outputs=pb.v_list, retain_graph=True)


def hesse_hvp(pb: Problem) -> Call:
    H = hesse.HessianOperator(pb.model, loss_fn, pb.batch)
    return lambda: H @ pb.v


def hesse_linearized(pb: Problem) -> Call:
    Hl = hesse.HessianOperator(pb.model, loss_fn, pb.batch).linearize()
    return lambda: Hl @ pb.v


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    factory: Callable[[Problem], Call]
    hvp: bool = False  # checked against the float64 product


METHODS = [
    Method("grad", "first order (forward + backward), default", first_order),
    Method("grad-math", "first order, math kernel", first_order_math),
    Method("hesse", "hesse H @ v", hesse_hvp, True),
    Method("plain", "double backward by hand, math kernel", plain_hvp, True),
    Method("hesse-lin", "hesse H.linearize() @ v", hesse_linearized, True),
    Method("plain-cached", "by hand, cached gradient graph", plain_hvp_cached, True),
]
BY_KEY = {m.key: m for m in METHODS}
PAIRS = {"hesse": "plain", "hesse-lin": "plain-cached"}  # hesse method -> its hand-written twin
MEMORY_KEYS = ("grad", "grad-math", "hesse", "plain")
