"""The models users train, run through hesse as a user runs them (no context manager, no
wrapper around hesse), against float64 references computed independently here.

One case table: each case builds a float32 model, its loss, its data (in the layout a user
of that model has), an optional :class:`hesse.ModelIO`, and ``ref_loss(model, batch)``,
the loss written plainly, which the references differentiate in float64 under the math
attention kernel (the test's own double backward).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesse
from hesse.func._io import map_tensors

transformers = pytest.importorskip("transformers")

V, T = 23, 6  # vocabulary, sequence length


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable
    data: Any  # one batch or a list of batches, as the user has it
    ref_loss: Callable[[nn.Module, Any], torch.Tensor]
    io: hesse.ModelIO | None = None
    frozen: list[str] = field(default_factory=list)  # names of frozen parameters
    fisher: bool = True  # per-sample losses are the samples' own (no batch statistics)
    weight: Callable[[Any], float] | None = None  # the reference's batch weights (tokens)
    single: bool = False  # forward takes a dict of inputs as one argument

    def call(self, model: nn.Module, inputs: Any) -> Any:
        """The model on these inputs, as the user calls it."""
        if isinstance(inputs, dict) and not self.single:
            return model(**inputs)
        return model(inputs)

    def batches(self) -> list:
        io = self.io or hesse.ModelIO()
        return [self.data] if io.is_batch(self.data) else list(self.data)


def lm_loss(logits, labels):
    """Causal LM cross-entropy: predict token t+1 from the prefix; -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


class Logits(nn.Module):
    """A Hugging Face model wrapped to return its logits from token ids."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(input_ids=ids).logits


def gpt2(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=12, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, **kw,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=12, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=T, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def encoder(train: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    m = nn.Sequential(enc, nn.Flatten(), nn.Linear(8 * 4, 3))
    return m.train(train)


def resnet(train: bool) -> nn.Module:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.tanh(x + self.bn(self.conv(x)))

    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), Block(4), nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    with torch.no_grad():
        m[1].bn.running_mean.uniform_(-0.5, 0.5)
        m[1].bn.running_var.uniform_(0.5, 2.0)
    return m.train(train)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.emb = nn.Embedding(V, 6)
        self.rnn = cell(6, 7, batch_first=True)
        self.head = nn.Linear(7, V)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


class DictKwargs(nn.Module):
    """``forward(x, mask)``: a dict batch is passed as keyword arguments."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x, mask):
        return self.lin(x * mask)


class DictSingle(nn.Module):
    """``forward(batch)`` takes the whole dict."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, batch):
        return torch.tanh(self.lin(batch["x"] * batch["mask"]))


def tied() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(V, 5), nn.Tanh(), nn.Linear(5, 5), nn.Linear(5, V, bias=False))
    m[3].weight = m[0].weight
    return m


def frozen_mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    m[2].requires_grad_(False)
    return m


def _xy(n=8, seed=1, d=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _hf_lm_batch(n, seed):
    ids = _ids(n, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def cases() -> list[Case]:
    ce = nn.CrossEntropyLoss()
    x, y = _xy()
    img = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    ids = _ids(4, 3)
    mask = (torch.rand(8, 5, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    bert_batch = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * T, [1] * T, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3]),
        "labels": torch.tensor([0, 2, 1, 2]),
    }
    seq_ce = lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten())  # noqa: E731
    return [
        Case("transformer-encoder-eval", encoder(False), ce, (torch.randn(6, 4, 8), y[:6]),
             lambda m, b: ce(m(b[0]), b[1])),
        Case("transformer-encoder-train", encoder(True), ce, (torch.randn(6, 4, 8), y[:6]),
             lambda m, b: ce(m(b[0]), b[1])),
        Case("gpt2-wrapped", Logits(gpt2()), lm_loss, [(ids, ids), (_ids(3, 5), _ids(3, 5))],
             lambda m, b: lm_loss(m(b[0]), b[1])),
        Case("gpt2-as-is-hf-batch", gpt2(), lm_loss, _hf_lm_batch(4, 3),
             lambda m, b: lm_loss(m(input_ids=b["input_ids"],
                                    attention_mask=b["attention_mask"]).logits, b["labels"])),
        Case("llama-as-is-hf-batch", llama(), lm_loss, [_hf_lm_batch(3, 6), _hf_lm_batch(3, 7)],
             lambda m, b: lm_loss(m(input_ids=b["input_ids"]).logits, b["labels"])),
        Case("bert-padded-hf-batch", bert(), ce, bert_batch,
             lambda m, b: ce(m(input_ids=b["input_ids"],
                               attention_mask=b["attention_mask"]).logits, b["labels"])),
        Case("resnet-bn-train", resnet(True), ce, (img, y[:6]), lambda m, b: ce(m(b[0]), b[1]),
             fisher=False),
        Case("resnet-bn-eval", resnet(False), ce, (img, y[:6]), lambda m, b: ce(m(b[0]), b[1])),
        Case("lstm", Recurrent(nn.LSTM), seq_ce, (ids, _ids(4, 8)),
             lambda m, b: seq_ce(m(b[0]), b[1])),
        Case("gru", Recurrent(nn.GRU), seq_ce, (ids, _ids(4, 8)),
             lambda m, b: seq_ce(m(b[0]), b[1])),
        Case("dict-inputs-kwargs", DictKwargs(), ce, ({"x": x, "mask": mask}, y),
             lambda m, b: ce(m(**b[0]), b[1])),
        Case("dict-inputs-single", DictSingle(), ce, {"x": x, "mask": mask, "y": y},
             lambda m, b: ce(m({"x": b["x"], "mask": b["mask"]}), b["y"]),
             io=hesse.ModelIO(targets="y"), single=True),
        Case("tied-weights", tied(), seq_ce, (ids, _ids(4, 9)),
             lambda m, b: seq_ce(m(b[0]), b[1])),
        Case("frozen-layer", frozen_mlp(), ce, (x, y), lambda m, b: ce(m(b[0]), b[1]),
             frozen=["2.weight", "2.bias"]),
        # sequence cross-entropy with ignored tokens, batches with different numbers of them:
        # the operator is the curvature of the mean over every counted token
        Case("gpt2-ignore-index-module", VocabSecond(gpt2()), ce_ignore, padded,
             lambda m, b: ce_ignore(m(b[0]), b[1]), fisher=False,
             weight=lambda b: float((b[1] != -100).sum())),
        Case("gpt2-ignore-index-function", gpt2(), lm_loss, padded_hf,
             lambda m, b: lm_loss(m(input_ids=b["input_ids"]).logits, b["labels"]),
             io=hesse.ModelIO(weight=shifted_tokens), fisher=False, weight=shifted_tokens),
    ]  # fmt: skip


class VocabSecond(nn.Module):
    """Logits as (N, V, T), the layout nn.CrossEntropyLoss takes for sequences."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(input_ids=ids).logits.transpose(1, 2)


ce_ignore = nn.CrossEntropyLoss(ignore_index=-100)


def _padded_labels(ids: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Labels with every position at or past ``keep[i]`` of row i ignored (-100)."""
    labels = ids.clone()
    for i, k in enumerate(keep):
        labels[i, k:] = -100
    return labels


def shifted_tokens(batch: dict) -> float:
    """Tokens the causal LM loss counts: labels[:, 1:] other than -100."""
    return float((batch["labels"][:, 1:] != -100).sum())


_a, _b = _ids(3, 12), _ids(2, 13)
padded = [(_a, _padded_labels(_a, [6, 2, 4])), (_b, _padded_labels(_b, [1, 6]))]
padded_hf = [{"input_ids": ids, "labels": lab} for ids, lab in padded]


CASES = {c.name: c for c in cases()}


# -- references: float64, math attention kernel, plain double backward -----------------


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]  # tied: once


def _double(case: Case) -> tuple[nn.Module, list]:
    m64 = copy.deepcopy(case.model).double()
    batches = [
        map_tensors(b, lambda t: t.double() if t.is_floating_point() else t) for b in case.batches()
    ]
    return m64, batches


def _weights(case: Case) -> list[float]:
    io = case.io or hesse.ModelIO()
    weight = case.weight or io.samples
    return [float(weight(b)) for b in case.batches()]


def reference_loss(case: Case, m64: nn.Module, batches: list) -> torch.Tensor:
    """The mean loss over all batches (weighted by their samples)."""
    w = _weights(case)
    return sum(wi * case.ref_loss(m64, b) for wi, b in zip(w, batches)) / sum(w)


def reference_hvp(case: Case, vs: torch.Tensor) -> torch.Tensor:
    m64, batches = _double(case)
    params = _trainable(m64)
    with sdpa_kernel([SDPBackend.MATH]):
        loss = reference_loss(case, m64, batches)
        g = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in g])
    cols = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(g @ v, params, retain_graph=True)])
        for v in vs.T
    ]
    return torch.stack(cols, 1)


def reference_ggn(case: Case, vs: torch.Tensor) -> torch.Tensor:
    r"""Explicit :math:`J^\top H_o J v` with plain autograd: J v as the derivative of the
    linear map :math:`u \mapsto J^\top u`, H_o by double backward of the loss in the
    outputs, J^T by a backward pass; batches summed by weight."""
    m64, batches = _double(case)
    params = _trainable(m64)
    io = case.io or hesse.ModelIO()
    w = _weights(case)
    out = torch.zeros(vs.shape, dtype=torch.float64)
    for wi, b in zip(w, batches):
        inputs, targets = io.split(b)
        with sdpa_kernel([SDPBackend.MATH]):
            o = io.select(case.call(m64, inputs))
            u = torch.zeros_like(o, requires_grad=True)
            jtu = torch.autograd.grad(o, params, u, create_graph=True)
            oo = o.detach().requires_grad_()
            go = torch.autograd.grad(case.loss_fn(oo, targets), oo, create_graph=True)[0]
            for j, v in enumerate(vs.T):
                vp = torch.split(v, [p.numel() for p in params])
                dot = sum((a * c.view_as(a)).sum() for a, c in zip(jtu, vp))
                jv = torch.autograd.grad(dot, u, retain_graph=True)[0]
                hjv = torch.autograd.grad(go, oo, jv, retain_graph=True)[0]
                jt = torch.autograd.grad(o, params, hjv, retain_graph=True)
                out[:, j] += wi * torch.cat([t.reshape(-1) for t in jt])
    return out / sum(w)


def reference_fisher(case: Case, vs: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher: the mean over samples of the outer products of the gradients of
    each sample's own loss."""
    m64, batches = _double(case)
    params = _trainable(m64)
    io = case.io or hesse.ModelIO()
    out, n = torch.zeros(vs.shape, dtype=torch.float64), 0
    for b in batches:
        size = io.samples(b)
        for i in range(size):
            one = map_tensors(
                b, lambda t, i=i, n=size: t[i : i + 1] if t.dim() and t.shape[0] == n else t
            )
            with sdpa_kernel([SDPBackend.MATH]):
                g = torch.autograd.grad(case.ref_loss(m64, one), params)
            g = torch.cat([t.reshape(-1) for t in g])
            out += torch.outer(g, g @ vs)
        n += size
    return out / n


def _directions(P: int, k: int = 2) -> torch.Tensor:
    return torch.randn(P, k, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 2e-4) -> None:
    err = float(torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref))
    assert err < rtol, f"relative error {err:.2e}"


# -- the operators against the references ------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_products_match_float64_double_backward(name):
    case = CASES[name]
    H = hesse.HessianOperator(case.model, case.loss_fn, case.data, io=case.io)
    P = sum(p.numel() for p in _trainable(case.model))
    assert H.shape == (P, P)  # tied weights once, frozen weights not unknowns
    vs = _directions(P)
    ref = reference_hvp(case, vs)
    _close(H @ vs.float(), ref)
    _close(H.linearize() @ vs.float(), ref)


@pytest.mark.parametrize("name", list(CASES))
def test_ggn_products_match_explicit_jt_h_j(name):
    case = CASES[name]
    G = hesse.GGNOperator(case.model, case.loss_fn, case.data, io=case.io)
    vs = _directions(G.shape[0])
    _close(G @ vs.float(), reference_ggn(case, vs))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.fisher])
def test_empirical_fisher_matches_per_sample_gradients(name):
    case = CASES[name]
    Fop = hesse.FisherOperator(case.model, case.loss_fn, case.data, io=case.io)
    vs = _directions(Fop.shape[0])
    _close(Fop @ vs.float(), reference_fisher(case, vs))


def test_a_dense_ggn_equals_jt_h_j_on_a_small_transformer():
    case = CASES["transformer-encoder-eval"]
    m64, (batch,) = _double(case)
    params = dict(m64.named_parameters())
    with sdpa_kernel([SDPBackend.MATH]):
        J = torch.func.jacrev(lambda ps: torch.func.functional_call(m64, ps, (batch[0],)))(params)
        o = m64(batch[0]).detach()
        Ho = torch.func.hessian(lambda z: case.loss_fn(z, batch[1]))(o)
    J = torch.cat([j.reshape(o.numel(), -1) for j in J.values()], 1)
    dense = J.T @ Ho.reshape(o.numel(), o.numel()) @ J
    G = hesse.GGNOperator(case.model, case.loss_fn, case.data).to_dense()
    torch.testing.assert_close(G.double(), dense, rtol=1e-4, atol=1e-6)


def test_the_users_attention_choice_is_restored():
    case = CASES["gpt2-as-is-hf-batch"]
    H = hesse.HessianOperator(case.model, case.loss_fn, case.data)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        H @ torch.ones(H.shape[0])
        assert torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()


def test_without_hesse_the_default_kernel_has_no_double_backward():
    """The premise: a plain double backward through the default CPU attention fails,
    so the tests above do exercise hesse's second-order context."""
    case = CASES["gpt2-as-is-hf-batch"]
    loss = case.ref_loss(case.model, case.data)
    g = torch.autograd.grad(loss, list(case.model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum(t.sum() for t in g), list(case.model.parameters()))


# -- analysis, optimizers and the CLI, as a user calls them ------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_every_analysis_function_runs_and_agrees(name):
    case = CASES[name]
    H = hesse.HessianOperator(case.model, case.loss_fn, case.data, io=case.io)
    top = hesse.eigenvalues(H, k=1, which="both", max_iter=40, seed=0)
    lam = top.eigenvalues.double()
    assert torch.isfinite(lam).all()
    # Ritz values of a symmetric operator lie inside its spectrum: compare with Rayleigh
    # quotients of the float64 reference at the Ritz vectors
    vecs = top.eigenvectors.double()
    ref = reference_hvp(case, vecs)
    rq = (vecs * ref).sum(0) / (vecs * vecs).sum(0)
    torch.testing.assert_close(lam, rq, rtol=2e-3, atol=1e-5)
    tr = hesse.trace(H, method="hutch++", num_matvecs=12, seed=0)
    dg = hesse.diagonal(H, method="xdiag", num_matvecs=12, seed=0)
    rho = hesse.spectral_density(H, num_probes=2, steps=10, seed=0)
    conv = hesse.convexity(H, seed=0, max_iter=30)
    for value in (tr.estimate, float(dg.estimate.sum()), float(rho.density.sum())):
        assert torch.isfinite(torch.tensor(value))
    assert conv.min_eigenvalue <= conv.max_eigenvalue
    rep = hesse.layer_report(
        case.model, case.loss_fn, case.data, max_iter=8, trace_matvecs=4, exact_limit=16,
        **({"io": case.io} if case.io is not None else {}),
    )  # fmt: skip
    names = {n for row in rep.rows for n in [row.name]}
    assert sum(row.size for row in rep.rows) == H.shape[0]  # every unknown once
    assert len(names) == len(rep.rows)


def _closure(case: Case, opt, batch) -> Callable[[], torch.Tensor]:
    def closure():
        opt.zero_grad()
        loss = case.ref_loss(case.model, batch)
        loss.backward()
        return loss

    return closure


OPTIMIZERS = {
    "hessian-free-ggn": lambda c, ps: hesse.optim.HessianFree(
        ps, model=c.model, loss_fn=c.loss_fn, io=c.io, cg_max_iter=5
    ),
    "hessian-free-closure": lambda c, ps: hesse.optim.HessianFree(ps, cg_max_iter=5),
    "subsampled-newton": lambda c, ps: hesse.optim.SubsampledNewton(
        ps, model=c.model, loss_fn=c.loss_fn, io=c.io, subsample=2, cg_max_iter=5
    ),
    "newton-cg": lambda c, ps: hesse.optim.NewtonCG(ps, damping=1.0, cg_max_iter=5),
    "lbfgs": lambda c, ps: hesse.optim.LBFGS(ps, max_iter=2),
    "adahessian": lambda c, ps: hesse.optim.AdaHessian(ps, lr=1e-2),
    "sophia": lambda c, ps: hesse.optim.Sophia(ps, lr=1e-2, estimator="hutchinson"),
    "sophia-gnb": lambda c, ps: hesse.optim.Sophia(ps, lr=1e-2, estimator="gnb"),
}


def _outputs_fn(case: Case, batch) -> Callable[[], Any]:
    """The model's raw output on the batch, as a user writes it (a ModelOutput for HF)."""
    io = case.io or hesse.ModelIO()
    inputs, _ = io.split(batch)
    return lambda: case.call(case.model, inputs)


ZOO_FOR_OPTIMIZERS = ["gpt2-as-is-hf-batch", "bert-padded-hf-batch", "lstm", "frozen-layer",
                      "tied-weights", "dict-inputs-single", "transformer-encoder-eval"]  # fmt: skip


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("name", ZOO_FOR_OPTIMIZERS)
def test_every_optimizer_trains_and_leaves_frozen_weights_alone(name, opt_name):
    case = CASES[name]
    model = case.model
    saved = copy.deepcopy(model.state_dict())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = case.batches()[0]
    try:
        # a user passes model.parameters(), frozen ones included
        opt = OPTIMIZERS[opt_name](case, model.parameters())
        closure = _closure(case, opt, batch)
        first = float(closure().detach())
        for _ in range(3):
            kwargs = {"batch": batch} if getattr(opt, "model", None) is not None else {}
            if opt_name == "sophia-gnb":
                kwargs = {"outputs_fn": _outputs_fn(case, batch)}
            loss = opt.step(closure, **kwargs)
            assert torch.isfinite(loss)
        last = float(closure().detach())
        assert last < first + 1e-6  # each method's globalisation never accepts an increase
        if not opt_name.startswith(("adahessian", "sophia")):  # those are not monotone
            assert last < first
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), f"{opt_name} moved frozen {n}"
    finally:
        model.load_state_dict(saved)


USER_FILE = """
import torch, transformers
import torch.nn.functional as F
torch.manual_seed(0)
cfg = transformers.GPT2Config(vocab_size=23, n_positions=6, n_embd=12, n_layer=2, n_head=2,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = transformers.GPT2LMHeadModel(cfg).eval()
ids = torch.randint(0, 23, (4, 6), generator=torch.Generator().manual_seed(3))
data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
def loss_fn(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
"""


def test_the_cli_on_a_hugging_face_users_file(capsys, tmp_path):
    import json

    from hesse.cli import main

    path = tmp_path / "gpt.py"
    path.write_text(USER_FILE)
    code = main(["spectrum", str(path), "-k", "1", "--no-density", "--per-layer", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    case = CASES["gpt2-as-is-hf-batch"]  # the same model, data and loss
    P = sum(p.numel() for p in _trainable(case.model))
    assert res["parameters"] == P
    layers = [r["name"] for r in res["layers"]]
    assert "lm_head" not in layers and "transformer.wte" in layers  # tied: once
    top = res["eigenvalues"]["values"][0]
    H = hesse.HessianOperator(case.model, case.loss_fn, case.data)
    ref = hesse.eigenvalues(H, k=1, seed=0, max_iter=80)
    assert top == pytest.approx(float(ref.eigenvalues[0]), rel=1e-3)


# -- CUDA: fused attention kernels and cuDNN RNNs (run by `make gpu-check`) ---------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_CASES = ["gpt2-as-is-hf-batch", "bert-padded-hf-batch", "llama-as-is-hf-batch", "lstm",
              "gru", "resnet-bn-train", "transformer-encoder-eval"]  # fmt: skip


def _on_cuda(case: Case) -> Case:
    model = copy.deepcopy(case.model).cuda()
    data = map_tensors(case.data, lambda t: t.cuda())
    return dataclasses.replace(case, model=model, data=data)


@cuda
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_products_match_the_float64_reference(name):
    case = CASES[name]
    on = _on_cuda(case)
    vs = _directions(sum(p.numel() for p in _trainable(case.model)))
    ref = reference_hvp(case, vs)  # on the CPU, float64
    H = hesse.HessianOperator(on.model, on.loss_fn, on.data, io=on.io)
    out = H @ vs.float().cuda()
    assert out.device.type == "cuda"
    _close(out.cpu(), ref, rtol=1e-3)  # TF32 may be on for matmuls
    G = hesse.GGNOperator(on.model, on.loss_fn, on.data, io=on.io)
    _close((G @ vs.float().cuda()).cpu(), reference_ggn(case, vs), rtol=1e-3)


@cuda
@pytest.mark.parametrize("name", ["lstm", "gpt2-as-is-hf-batch"])
def test_cuda_closure_optimizers_differentiate_cudnn_and_fused_attention(name):
    on = _on_cuda(CASES[name])
    batch = on.batches()[0]
    for make in (OPTIMIZERS["adahessian"], OPTIMIZERS["newton-cg"]):
        opt = make(on, on.model.parameters())
        closure = _closure(on, opt, batch)
        first = float(closure().detach())
        for _ in range(2):
            assert torch.isfinite(opt.step(closure))
        assert float(closure().detach()) < first + 1e-6
    assert torch.backends.cudnn.enabled  # the user's setting is back


@cuda
def test_cuda_bf16_gpt2_products_and_analysis():
    case = CASES["gpt2-as-is-hf-batch"]
    model = copy.deepcopy(case.model).cuda().to(torch.bfloat16)
    data = map_tensors(case.data, lambda t: t.cuda())
    H = hesse.HessianOperator(model, case.loss_fn, data)
    assert H.dtype == torch.bfloat16
    vs = _directions(H.shape[0])
    ref = reference_hvp(case, vs)
    _close((H @ vs.to(device="cuda", dtype=torch.bfloat16)).cpu(), ref, rtol=0.1)
    top = hesse.eigenvalues(H, k=1, seed=0, max_iter=30)
    assert torch.isfinite(top.eigenvalues).all()


@pytest.mark.parametrize(
    "name", ["gpt2-as-is-hf-batch", "llama-as-is-hf-batch", "bert-padded-hf-batch", "lstm"]
)
def test_finite_differences_on_smooth_models_are_accurate_and_say_so(name, recwarn):
    case = CASES[name]
    fd = hesse.FiniteDifferenceHessian(case.model, case.loss_fn, case.data, io=case.io)
    vs = _directions(fd.shape[0])
    _close(fd @ vs.float(), reference_hvp(case, vs), rtol=1e-3)
    assert 0 < fd.product_rtol < 1e-2  # measured, and small
    assert not [w for w in recwarn if issubclass(w.category, hesse.FiniteDifferenceWarning)]


def test_finite_differences_across_relu_kinks_warn_and_are_not_certified():
    case = CASES["transformer-encoder-eval"]  # ReLU feed-forward layers
    fd = hesse.FiniteDifferenceHessian(case.model, case.loss_fn, case.data)
    with pytest.warns(hesse.FiniteDifferenceWarning):
        res = hesse.eigenvalues(fd, k=1, seed=0, max_iter=20)
    assert fd.product_rtol > 1e-2
    assert res.error_floor >= fd.product_rtol * abs(float(res.eigenvalues[0])) * 0.99


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gpt2_in_float64_and_bfloat16(dtype):
    """Products in the model's dtype; the analysis says which dtype its products had."""
    case = CASES["gpt2-as-is-hf-batch"]
    model = copy.deepcopy(case.model).to(dtype)
    H = hesse.HessianOperator(model, case.loss_fn, case.data)
    assert H.dtype == dtype
    vs = _directions(H.shape[0])
    ref = reference_hvp(case, vs)  # the float32 model's weights, in float64
    if dtype == torch.float64:
        # the float32 weights are exact in float64: the same function, to rounding
        _close(H @ vs, ref, rtol=1e-10)
    else:
        # bf16 rounds the weights (2^-9 relative) and every operation: agreement to a few %
        _close(H @ vs.to(dtype), ref, rtol=0.1)
    top = hesse.eigenvalues(H, k=1, seed=0, max_iter=30)
    assert top.dtype == dtype and torch.isfinite(top.eigenvalues).all()
    conv = hesse.convexity(H, seed=0, max_iter=30)
    assert conv.dtype == dtype
