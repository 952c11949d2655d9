"""The Hessian spectrum of a small character-level GPT during training.

A two-block GPT (token and position embeddings, causal self-attention through
``torch.nn.functional.scaled_dot_product_attention``, a GELU MLP, LayerNorm, output layer
tied to the token embedding; about 30k parameters) learns to predict the next character of
the source code of a few standard-library modules (about 100 KB of text that ships with
Python: nothing is downloaded). At the start, half-way and at the end of training, hesse
measures the Hessian of the mean cross-entropy on a fixed evaluation set of a few batches:
the top three eigenvalues and the bottom one (Lanczos, with certified residuals), the trace
(XTrace, with its standard error) and the spectral density (stochastic Lanczos quadrature).

Attention's default CPU kernel (flash) has no double backward. The example does nothing
about it: hesse runs its own forward passes with the math kernel
(:func:`hesse.func.second_order`).

Run (about 30 s on one CPU core)::

    python examples/char_gpt_spectrum.py                       # 400 steps, seed 0
    python examples/char_gpt_spectrum.py --steps 1000 --seed 1 --plot out/char_gpt.png

The run is deterministic for a given seed (and number of threads).
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hesse

# Standard-library modules whose source is the training text (pure Python, in every
# CPython installation).
MODULES = ("textwrap", "fnmatch", "glob", "shlex", "string", "bisect", "heapq", "colorsys")


@dataclass(frozen=True)
class Config:
    """The model's size. The defaults give about 30k parameters."""

    vocab: int
    block: int = 32  # context length
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 2


# -- data ---------------------------------------------------------------------------------


def load_text(modules: tuple[str, ...] = MODULES) -> str:
    """The source of ``modules``, ASCII only (a few stray characters are dropped)."""
    text = "\n".join(inspect.getsource(__import__(name)) for name in modules)
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)


class Tokenizer:
    """Characters to ids and back; the vocabulary is the characters of the text."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def sample_batch(
    ids: Tensor, batch: int, block: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of ``block`` characters and the characters that follow."""
    start = torch.randint(0, len(ids) - block - 1, (batch,), generator=generator)
    x = torch.stack([ids[s : s + block] for s in start.tolist()])
    y = torch.stack([ids[s + 1 : s + block + 1] for s in start.tolist()])
    return x, y


def eval_batches(
    ids: Tensor, num: int, batch: int, block: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """A fixed evaluation set: ``num`` batches of (ids, next ids), the same for every call."""
    g = torch.Generator().manual_seed(seed)
    return [sample_batch(ids, batch, block, g) for _ in range(num)]


# -- the model ------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A GPT over characters: logits of shape ``(B, T, vocab)`` for ids ``(B, T)``."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block, cfg.n_embd)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.n_layer)))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one parameter, counted once
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.blocks(self.tok_emb(ids) + self.pos_emb(pos))
        return self.head(self.ln_f(x))


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position of every sequence."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


# -- training and the curvature ---------------------------------------------------------


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    return sum(float(loss_fn(model(x), y)) for x, y in batches) / len(batches)


@dataclass(frozen=True)
class Curvature:
    """What hesse measured at one point of training."""

    step: int
    loss: float
    top: hesse.linalg.EigenResult
    bottom: hesse.linalg.EigenResult
    trace: hesse.linalg.TraceResult
    density: hesse.linalg.DensityResult
    seconds: float


def curvature(
    model: nn.Module,
    data: list[tuple[Tensor, Tensor]],
    step: int,
    *,
    seed: int = 0,
    trace_matvecs: int = 60,
    probes: int = 5,
    lanczos_steps: int = 60,
) -> Curvature:
    """The Hessian's top 3 and bottom eigenvalues, trace and spectral density on ``data``."""
    t0 = time.perf_counter()
    H = hesse.HessianOperator(model, loss_fn, data)  # lazy, (P, P)
    # One forward pass and gradient graph per batch, reused by every product below.
    Hl = H.linearize()
    top = hesse.eigenvalues(Hl, k=3, which="largest", tol=1e-3, seed=seed)
    bottom = hesse.eigenvalues(Hl, k=1, which="smallest", tol=1e-2, max_iter=80, seed=seed)
    tr = hesse.trace(Hl, method="xtrace", num_matvecs=trace_matvecs, seed=seed)
    rho = hesse.spectral_density(Hl, num_probes=probes, steps=lanczos_steps, seed=seed)
    loss = eval_loss(model, data)
    return Curvature(step, loss, top, bottom, tr, rho, time.perf_counter() - t0)


def train(
    model: nn.Module,
    ids: Tensor,
    data: list[tuple[Tensor, Tensor]],
    *,
    steps: int,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    checkpoints: tuple[int, ...] = (),
    analyse=curvature,
) -> tuple[list[float], list[Curvature]]:
    """AdamW on random windows of ``ids``; ``analyse`` at the steps in ``checkpoints``
    (before the update of that step; ``steps`` itself is the end). Returns the training
    losses and the analyses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    losses, found = [], []
    for step in range(steps + 1):
        if step in checkpoints:
            found.append(analyse(model, data, step, seed=seed))
        if step == steps:
            break
        x, y = sample_batch(ids, batch, model.cfg.block, g)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses, found


# -- report -----------------------------------------------------------------------------------


def print_table(results: list[Curvature]) -> None:
    head = (
        f"{'step':>5} {'eval loss':>9} {'λ1':>9} {'λ2':>9} {'λ3':>9} {'λmin':>10} "
        f"{'trace ± stderr':>18} {'matvecs':>7} {'s':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        l1, l2, l3 = r.top.eigenvalues.tolist()
        lmin = float(r.bottom.eigenvalues[0])
        mv = r.top.matvecs + r.bottom.matvecs + r.trace.matvecs + r.density.matvecs
        tr = f"{r.trace.estimate:.3g} ± {r.trace.stderr:.2g}"
        print(
            f"{r.step:>5} {r.loss:>9.3f} {l1:>9.4g} {l2:>9.4g} {l3:>9.4g} {lmin:>10.3g} "
            f"{tr:>18} {mv:>7} {r.seconds:>5.1f}"
        )
    worst = max(float(r.top.residuals.max() / r.top.eigenvalues.abs().max()) for r in results)
    print(
        f"largest relative residual of the top eigenpairs: {worst:.1e}; "
        + "bottom: "
        + ", ".join(f"{r.bottom.status} ({float(r.bottom.residuals[0]):.1e})" for r in results)
    )


def plot(results: list[Curvature], path: Path) -> None:
    import hesse.plot

    fig = None
    for r in results:
        ax = None if fig is None else fig.axes[0]
        fig = hesse.plot.spectral_density(
            r.density,
            ax=ax,
            label=f"step {r.step} (loss {r.loss:.2f})",
            title="Hessian spectral density of a character-level GPT",
        )
    fig.axes[0].legend(loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="AdamW steps (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, help="PNG of the spectral densities")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    text = load_text()
    tok = Tokenizer(text)
    ids = tok.encode(text)
    split = int(0.9 * len(ids))
    train_ids, held_out = ids[:split], ids[split:]
    model = CharGPT(Config(vocab=len(tok)))
    data = eval_batches(held_out, num=2, batch=16, block=model.cfg.block, seed=args.seed)
    print(
        f"{len(text) // 1000} KB of standard-library source, vocabulary {len(tok)}; "
        f"CharGPT with P = {num_params(model)} parameters; Hessian on {len(data)} held-out "
        f"batches of {data[0][0].shape[0]} x {data[0][0].shape[1]} characters"
    )
    t0 = time.perf_counter()
    checkpoints = (0, args.steps // 2, args.steps)
    losses, results = train(
        model, train_ids, data, steps=args.steps, seed=args.seed, checkpoints=checkpoints
    )
    print(
        f"training loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f} "
        f"(mean of the last 20 steps); {time.perf_counter() - t0:.1f}s in all\n"
    )
    print_table(results)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
