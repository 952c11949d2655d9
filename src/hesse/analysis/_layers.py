"""Curvature per parameter block (layer) of a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from hesse.analysis._convexity import Verdict, _report_operator
from hesse.linalg import xtrace
from hesse.operators import DenseOperator, HessianOperator


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


@dataclass(frozen=True)
class LayerReport:
    rows: list[LayerRow]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [{**asdict(r), "verdict": str(r.verdict)} for r in self.rows]

    def to_table(self) -> str:
        head = (
            f"{'block':24s} {'size':>8s} {'top eig':>11s} {'min eig':>11s} {'trace':>11s}  verdict"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name:24s} {r.size:8d} {r.top_eigenvalue:11.4g} "
                f"{r.min_eigenvalue:11.4g} {r.trace:11.4g}  {r.verdict}"
                + ("" if r.converged else " (not certified: raise max_iter)")
            )
        return "\n".join(lines)


def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """The parameters (that require grad) of each module that owns some directly."""
    blocks: dict[str, list[str]] = {}
    for mod_name, module in model.named_modules():
        names = [
            f"{mod_name}.{n}" if mod_name else n
            for n, p in module.named_parameters(recurse=False)
            if p.requires_grad
        ]
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
    _operator: Callable[..., Any] = HessianOperator,
) -> LayerReport:
    """Top and bottom eigenvalue, trace and definiteness of each layer's Hessian block.

    Args:
        model, loss_fn, data: as for :class:`hesse.HessianOperator`.
        blocks: ``{name: [parameter names]}``; by default one block per module that owns
            parameters.
        tol, max_iter: Lanczos tolerance and steps for the extreme eigenvalues.
        trace_matvecs: products for the XTrace estimate of a block larger than
            ``exact_limit``; a smaller block is formed densely (``P`` products), which
            gives its eigenvalues and trace exactly.
        rtol: eigenvalues below ``rtol * max|lambda|`` in magnitude count as zero.
    """
    blocks = dict(blocks) if blocks is not None else parameter_blocks(model)
    rows = []
    for name, params in blocks.items():
        H = _operator(model, loss_fn, data, params=list(params)).linearize()
        n = H.shape[0]
        if n <= exact_limit:
            # P products give the whole block: exact eigenvalues and trace, no estimates
            dense = H.to_dense()
            target, tr, err, mv = DenseOperator(dense), float(dense.trace()), 0.0, n
        else:
            t = xtrace(H, trace_matvecs, seed=seed)
            target, tr, err, mv = H, t.estimate, t.stderr, t.matvecs
        # the same verdict, with the same certification, as hesse.convexity
        rep = _report_operator(
            target,
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
            )
        )
    return LayerReport(rows)
