"""Curvature per parameter block (layer) of a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from hesse._core._checks import check_real, check_seed
from hesse.analysis._convexity import Verdict, _report_operator
from hesse.func import ModelIO
from hesse.linalg import xtrace
from hesse.linalg._common import promote
from hesse.operators import GGNOperator, HessianOperator, KFACOperator
from hesse.operators._kfac import _layers


@dataclass(frozen=True)
class LayerRow:
    """One parameter block's curvature: the diagonal block of the Hessian for its
    parameters (the other parameters held fixed)."""

    name: str
    size: int
    top_eigenvalue: float
    min_eigenvalue: float
    trace: float
    trace_stderr: float
    verdict: Verdict
    matvecs: int
    converged: bool  # the verdict is certified (exact, or backed by converged Lanczos ends)
    error_floor: float  # the eigenvalues' error the products' precision leaves
    dtype: torch.dtype  # of the products (the eigenvalue problem: float32 for half types)
    # with kfac=True: ||K - G||_F / ||G||_F of type-2 KFAC against the exact GGN block
    # (None: the block is larger than exact_limit, or not made of KFAC's layers)
    kfac_error: float | None = None


@dataclass(frozen=True)
class LayerReport:
    rows: list[LayerRow]
    kfac: bool = False  # the rows carry KFAC's error

    def as_dicts(self) -> list[dict[str, Any]]:
        """The rows as plain values (verdict and dtype as strings: ready for JSON);
        ``kfac_error`` only in a report made with ``kfac=True``."""
        out = []
        for r in self.rows:
            row = {**asdict(r), "verdict": str(r.verdict)}
            row["dtype"] = str(r.dtype).removeprefix("torch.")
            if not self.kfac:
                del row["kfac_error"]
            out.append(row)
        return out

    def to_table(self) -> str:
        head = f"{'block':24s} {'size':>8s} {'top eig':>11s} {'min eig':>11s} {'trace':>11s}"
        head += f" {'KFAC err':>9s}" if self.kfac else ""
        head += "  verdict"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            kfac = ""
            if self.kfac:
                kfac = " " + (f"{r.kfac_error:9.3g}" if r.kfac_error is not None else f"{'-':>9s}")
            lines.append(
                f"{r.name:24s} {r.size:8d} {r.top_eigenvalue:11.4g} "
                f"{r.min_eigenvalue:11.4g} {r.trace:11.4g}{kfac}  {r.verdict}"
                + ("" if r.converged else f" (not certified: {_why(r)})")
            )
        return "\n".join(lines)


def _why(row: LayerRow) -> str:
    """The likely reason a row's verdict is not certified: an end within the products'
    error of zero, or an end that Lanczos did not converge."""
    if min(abs(row.top_eigenvalue), abs(row.min_eigenvalue)) <= 2 * row.error_floor:
        return f"an eigenvalue is within the error of {row.dtype} products"
    return "raise max_iter"


def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """The parameters (that require grad) of each module that owns some directly, each
    once, under its name in ``model.named_parameters()``: a tied parameter belongs to the
    first module that owns it, and a module whose parameters are all tied to earlier ones
    has no block.

    Example:
        >>> m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> m[1].weight = m[0].weight  # tied, as a language model's head and embedding
        >>> parameter_blocks(m)
        {'0': ['0.weight']}
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    seen: set[int] = set()
    blocks: dict[str, list[str]] = {}
    for mod_name, module in model.named_modules():
        names = []
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                names.append(canonical[id(p)])
        if names:
            blocks[mod_name or "(root)"] = names
    return blocks


def layer_report(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    data: Any,
    *,
    blocks: dict[str, Sequence[str]] | None = None,
    tol: float = 1e-3,
    max_iter: int = 60,
    trace_matvecs: int = 60,
    exact_limit: int = 256,
    rtol: float = 1e-6,
    seed: int | None = 0,
    io: ModelIO | None = None,
    kfac: bool = False,
    _operator: Callable[..., Any] = HessianOperator,
    _ggn: Callable[..., Any] = GGNOperator,
    _kfac: Callable[..., Any] = KFACOperator,
) -> LayerReport:
    r"""Top and bottom eigenvalue, trace and definiteness of each layer's Hessian block.

    Args:
        model, loss_fn, data, io: as for :class:`hesse.HessianOperator`.
        blocks: ``{name: [parameter names]}``; by default one block per module that owns
            parameters.
        tol, max_iter: Lanczos tolerance and steps for the extreme eigenvalues.
        trace_matvecs: products for the XTrace estimate of a block larger than
            ``exact_limit``; a smaller block is formed densely (``P`` products), which
            gives its eigenvalues and trace exactly.
        rtol: eigenvalues below ``rtol * max|lambda|`` in magnitude count as zero.
        kfac: also report, for each block of at most ``exact_limit`` parameters made of
            ``nn.Linear`` / ``nn.Conv2d`` layers, type-2 KFAC's relative error against the
            exact Gauss-Newton block, :math:`\|K_\ell - G_\ell\|_F / \|G_\ell\|_F`
            (:class:`hesse.KFACOperator` and :class:`hesse.GGNOperator` on the block's
            parameters, formed densely); ``None`` for the other blocks.

    For a float16 or bfloat16 model the products run in its dtype and the rest (the dense
    block, its eigenvalues, Lanczos) in float32; each row's ``error_floor`` says how far
    its eigenvalues can be trusted, and its verdict is certified only beyond it.
    """
    seed = check_seed(seed)
    tol = check_real(tol, "tol", 0.0, 1.0, open_lo=True, open_hi=True)
    rtol = check_real(rtol, "rtol", 0.0, 1.0, open_hi=True)
    if not isinstance(kfac, bool):
        raise TypeError(f"kfac must be True or False, got {kfac!r}")
    blocks = dict(blocks) if blocks is not None else parameter_blocks(model)
    rows = []
    for name, params in blocks.items():
        error = None
        if kfac and _kfac_covers(model, params):
            size = sum(dict(model.named_parameters())[p].numel() for p in params)
            if size <= exact_limit:
                error = _kfac_error(
                    _kfac(model, loss_fn, data, params=list(params), io=io),
                    _ggn(model, loss_fn, data, params=list(params), io=io),
                )
        H = _operator(model, loss_fn, data, params=list(params), io=io).linearize()
        n = H.shape[0]
        dense = None
        if n <= exact_limit:
            # P products give the whole block: exact eigenvalues and trace, no estimates
            dense = promote(H).to_dense()
            tr, err, mv = float(dense.trace()), 0.0, n
        else:
            t = xtrace(H, trace_matvecs, seed=seed)
            tr, err, mv = t.estimate, t.stderr, t.matvecs
        # the same verdict, with the same certification, as hesse.convexity
        rep = _report_operator(
            H,
            dense=dense,
            rtol=rtol,
            atol=0.0,
            dense_limit=exact_limit,
            lanczos_tol=tol,
            seed=seed,
            max_iter=min(n, max_iter),
            warn=False,  # the row says whether it is certified
        )
        rows.append(
            LayerRow(
                name,
                n,
                rep.max_eigenvalue,
                rep.min_eigenvalue,
                tr,
                err,
                rep.verdict,
                mv + rep.matvecs,
                rep.certified,
                rep.error_floor,
                H.dtype,
                error,
            )
        )
    return LayerReport(rows, kfac)


def _kfac_covers(model: nn.Module, params: Sequence[str]) -> bool:
    """Whether every parameter of a block (by name) belongs to a layer KFAC covers."""
    named = dict(model.named_parameters())
    if any(not isinstance(p, str) or p not in named for p in params):
        return False  # tensors, or names the operators will explain
    fn = SimpleNamespace(model=model, names=list(params), _selected=[named[p] for p in params])
    covered = [i for la in _layers(fn, strict=False) for i in (la.weight, la.bias)]
    return len([i for i in covered if i is not None]) == len(params)


def _kfac_error(K: Any, G: Any) -> float:
    r""":math:`\|K - G\|_F / \|G\|_F` of two operators over the same parameters, formed
    densely (half types in float32; 0 when both are 0)."""
    k, g = promote(K).to_dense(), promote(G).to_dense()
    norm = float(torch.linalg.matrix_norm(g))
    diff = float(torch.linalg.matrix_norm(k - g))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
