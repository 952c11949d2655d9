"""Finite-difference Hessian-vector products: the Richardson rule, the step, and the error
estimate, against float64 references by double backward (independent of hesse)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hesse
from hesse import FiniteDifferenceHessian
from hesse.func._tensor import FiniteDifferenceWarning, fd_scale, fd_step

f64 = torch.float64


# -- the rule, on functions whose truncation error is known in closed form -------------------
def test_richardson_is_exact_for_a_quartic_and_reports_the_wide_difference():
    # f = sum c_i x_i^4: D(h) = Hv + 4 c h^2 v^3 exactly, so (4 D(h/2) - D(h)) / 3 = Hv and
    # D(h/2) - D(h) = -3 c h^2 v^3.
    c = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    x = torch.tensor([0.7, -1.3, 2.0], dtype=f64)
    v = torch.tensor([1.5, 0.5, -1.0], dtype=f64)
    h = 1e-2
    hv, err = hesse.fd_hvp(lambda x: (c * x**4).sum(), x, v, h=h, return_error=True)
    exact = 12 * c * x**2 * v
    torch.testing.assert_close(hv, exact, rtol=1e-11, atol=0)
    assert err == pytest.approx(float((3 * c * h**2 * v**3).norm() / exact.norm()), rel=1e-6)
    assert isinstance(hesse.fd_hvp(lambda x: (c * x**4).sum(), x, v, h=h), torch.Tensor)


def test_default_steps_are_h_and_h_over_2_with_the_documented_scale():
    x = torch.tensor([3.0, -4.0], dtype=f64)  # root mean square sqrt(12.5)
    v = torch.tensor([2.0, 0.0], dtype=f64)
    seen = []

    def g(y):
        seen.append(float((y - x).norm() / v.norm()))
        return 3 * y**2

    hesse.fd_hvp(None, x, v, grad_fn=g)
    h = 0.5 * torch.finfo(f64).eps ** (1 / 3) * math.sqrt(12.5) / 2.0  # t = s / |v_1|
    assert sorted(seen) == pytest.approx([h / 2, h / 2, h, h], rel=1e-9)
    assert fd_step(torch.float32) == pytest.approx(0.5 * (2.0**-23) ** (1 / 3), rel=1e-12)


def test_fd_scale_per_tensor_magnitudes_floor_and_zero_direction():
    a = torch.full((4,), 2.0)  # rms 2
    b = torch.zeros(12)  # rms 0: floored at rms(all) / 4 = sqrt(16 / 16) / 4 = 0.25
    # v on a only (one coordinate): t = 2 / |v_a|
    va = torch.zeros(3, 4)
    vb = torch.zeros(3, 12)
    va[0, 1] = 0.5
    # v spread evenly over b (12 coordinates of 1): t = 0.25 * sqrt(12) / sqrt(12) = 0.25
    vb[1] = 1.0
    t = fd_scale([a, b], [va, vb])  # the third direction is zero
    assert t == pytest.approx([2.0 / 0.5, 0.25, 0.0], rel=1e-6)
    assert fd_scale([torch.zeros(3)], [torch.ones(1, 3)]) == pytest.approx([1.0 * 3**0.5 / 3**0.5])


def test_a_kink_inside_the_step_is_flagged():
    x = torch.tensor([1.0, 1e-7], dtype=f64)
    v = torch.tensor([0.0, 1.0], dtype=f64)

    def f(x):
        return 0.5 * (torch.relu(x) ** 2).sum()  # Hessian diag(x > 0): exactly 1 here

    hv, err = hesse.fd_hvp(f, x, v, return_error=True)
    assert float((hv - v).norm()) > 0.1 and err > 1e-2
    with pytest.warns(FiniteDifferenceWarning, match="HessianOperator"):
        hesse.fd_hvp(f, x, v)


# -- models: float32 products against float64 double backward --------------------------------
def _lm_loss(o, t):
    return F.cross_entropy(o.flatten(0, 1), t.flatten())


class LM(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(ids).logits


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    c = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2, attn_implementation="eager"
    )
    return LM(GPT2LMHeadModel(c))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return LM(LlamaForCausalLM(c))


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    c = BertConfig(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return LM(BertForMaskedLM(c))


class _LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.r, self.o = (
            nn.Embedding(50, 8),
            nn.LSTM(8, 12, batch_first=True),
            nn.Linear(12, 50),
        )

    def forward(self, ids):
        return self.o(self.r(self.e(ids))[0])


class _Encoder(nn.Module):  # nn.TransformerEncoder: ReLU by default
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.e = nn.Embedding(50, 8)
        self.t = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.o = nn.Linear(8, 50)

    def forward(self, ids):
        return self.o(self.t(self.e(ids)))


class _ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b, self.c2 = (
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x):
        return F.relu(x + self.c2(F.relu(self.b(self.c1(x)))))


def _resnet():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        _ResBlock(4),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _relu_mlp():
    return nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def _tokens():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 8), generator=g)
    return ids, torch.roll(ids, -1, 1)


def _images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def _features():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)


def _case(make, data, loss_fn, train=False):
    torch.manual_seed(0)
    m32 = make().train(train)
    m64 = copy.deepcopy(m32).double()
    x, y = data
    x64 = x.double() if x.is_floating_point() else x
    names = [n for n, _ in m64.named_parameters()]
    shapes = [p.shape for p in m64.parameters()]
    sizes = [p.numel() for p in m64.parameters()]
    buffers = dict(m64.named_buffers())

    def loss(theta):  # float64 loss of the flat parameters (a copy of the float32 point)
        ps = dict(zip(names, (t.view(s) for t, s in zip(torch.split(theta, sizes), shapes))))
        return loss_fn(functional_call(m64, (ps, copy.deepcopy(buffers)), (x64,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    return m32, loss, theta


def _double_backward(loss, theta, V):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        t = theta.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(t), t, create_graph=True)
        return torch.stack([torch.autograd.grad(g, t, v, retain_graph=True)[0] for v in V.T], 1)


def _directions(P, n, seed=5):
    return torch.randn(P, n, generator=torch.Generator().manual_seed(seed), dtype=f64)


SMOOTH = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "lstm": _LSTM}


@pytest.mark.parametrize("name", list(SMOOTH))
def test_float32_products_of_smooth_models_within_1e_3(name):
    pytest.importorskip("transformers")
    m32, loss, theta = _case(SMOOTH[name], _tokens(), _lm_loss)
    # the extreme eigenvectors, from the dense float64 Hessian (reverse over reverse)
    H = torch.func.jacrev(torch.func.grad(loss))(theta)
    H = 0.5 * (H + H.T)
    _, U = torch.linalg.eigh(H)
    V = torch.cat([_directions(len(theta), 2), U[:, [-1, 0]]], 1)
    FD = FiniteDifferenceHessian(m32, _lm_loss, _tokens())
    assert FD.product_rtol == 0.0 and FD.last_error == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", FiniteDifferenceWarning)
        out = (FD @ V.float()).double()
    ref = H @ V
    err = ((out - ref).norm(dim=0) / ref.norm(dim=0)).tolist()
    assert max(err) < 1e-3, err
    # the estimate is honest (about an upper bound) and not alarmist
    assert all(e <= 2 * est + 1e-6 for e, est in zip(err, FD.last_error)), (err, FD.last_error)
    assert 0 < FD.product_rtol <= max(FD.last_error) < 1e-2
    assert FD.linearize() is FD


ROUGH = {
    "relu_mlp": (_relu_mlp, _features, F.cross_entropy, False),
    "resnet_bn": (_resnet, _images, F.cross_entropy, True),
    "encoder": (_Encoder, _tokens, _lm_loss, False),
}


@pytest.mark.parametrize("name", list(ROUGH))
def test_kinks_are_flagged_not_silently_wrong(name):
    make, data, loss_fn, train = ROUGH[name]
    m32, loss, theta = _case(make, data(), loss_fn, train)
    V = _directions(len(theta), 3)
    ref = _double_backward(loss, theta, V)  # the Hessian of the local linear pieces
    FD = FiniteDifferenceHessian(m32, loss_fn, data())
    with pytest.warns(FiniteDifferenceWarning) as record:
        out = (FD @ V.float()).double()
        FD @ V[:, 0].float()
    assert len([w for w in record if w.category is FiniteDifferenceWarning]) == 1  # once
    err = ((out - ref).norm(dim=0) / ref.norm(dim=0)).tolist()
    assert max(err) > 1e-2  # finite differences are wrong here ...
    assert all(est > 1e-2 for e, est in zip(err, FD.last_error) if e > 1e-2)  # ... and say so
    assert FD.product_rtol > 1e-2


def test_estimate_covers_the_whole_data_not_one_batch():
    # Two batches: the product is of the mean loss; the estimate is of the combined product.
    m32, loss, theta = _case(_LSTM, _tokens(), _lm_loss)
    ids, tgt = _tokens()
    batches = [(ids[:1], tgt[:1]), (ids[1:], tgt[1:])]
    V = _directions(len(theta), 2)
    FD = FiniteDifferenceHessian(m32, _lm_loss, batches)
    out = (FD @ V.float()).double()
    ref = _double_backward(loss, theta, V)  # the same tokens in one batch: the same mean
    err = ((out - ref).norm(dim=0) / ref.norm(dim=0)).tolist()
    assert max(err) < 1e-3 and all(e <= 2 * est + 1e-6 for e, est in zip(err, FD.last_error))
