"""The problem and the runs of ``memory_budget.py`` (which describes the method): the CNN
with BatchNorm over N random images, the top eigenvalue by hesse and by PyHessian, and one
configuration measured in a fresh process (:func:`worker`).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import hesse
from _memory import malloc_trim, peak_meter
from _peers import patched, pyhessian_hessian

BATCH = 128
TOL = 1e-3  # relative tolerance of the top eigenvalue, both libraries
HVP_TOLERANCE = 1e-4  # hesse's product against PyHessian's
CONFIGS = {  # key -> (label, HESSE_MEMORY_BUDGET: None unset, "" for PyHessian)
    "hesse_default": ("hesse default", None),
    "hesse_256M": ("hesse 256M", "256M"),
    "hesse_0": ("hesse 0", "0"),
    "pyhessian": ("PyHessian", ""),
}

# -- problem ----------------------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def make_problem(n: int, device: torch.device) -> tuple[nn.Module, DataLoader]:
    """The model in eval mode, its BatchNorm statistics averaged over the data, and the
    loader (tensors on ``device``)."""
    model = make_model().to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for xb, _ in loader:
            model(xb)
    return model.eval(), loader


def params_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the two libraries ------------------------------------------------------------------


def hesse_eigen(model: nn.Module, loader: Any) -> dict:
    """Top eigenvalue with hesse; what ``linearize()`` kept is read as it is built."""
    seen: list[dict] = []
    init = hesse.LinearizedCurvature.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        seen.append(
            {
                "memory_budget": self.memory_budget,
                "cached_batches": self.cached_batches,
                "cached_bytes": self.cached_bytes,
                "recomputed": self.recomputed,
            }
        )

    with patched(hesse.LinearizedCurvature, "__init__", spy):
        H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), loader)
        r = hesse.eigenvalues(H, k=1, tol=TOL, seed=0)
    theta = float(r.eigenvalues[0])
    return {
        "eigenvalue": theta,
        "products": r.matvecs,
        "status": str(r.status),
        "certified_rel_error": float(r.residuals[0]) / abs(theta),
        **(seen[-1] if seen else {}),
    }


def pyhessian_eigen(model: nn.Module, loader: Any) -> dict:
    torch.manual_seed(0)
    hc = pyhessian_hessian(model, nn.CrossEntropyLoss(), dataloader=loader)
    count = [0]
    fn = hc.dataloader_hv_product

    def counted(v: Any) -> Any:
        count[0] += 1
        return fn(v)

    hc.dataloader_hv_product = counted
    values, _ = hc.eigenvalues(top_n=1, tol=TOL)
    model.zero_grad(set_to_none=True)
    return {"eigenvalue": float(values[0]), "products": count[0]}


def one_batch_warmup(key: str, model: nn.Module, loader: DataLoader) -> None:
    """One product of the configuration's library on one batch (kernels, lazy imports)."""
    batch = [next(iter(loader))]
    if key == "pyhessian":
        hc = pyhessian_hessian(model, nn.CrossEntropyLoss(), dataloader=batch)
        hc.dataloader_hv_product([torch.randn_like(p) for p in hc.params])
    else:
        H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), batch)
        H.linearize() @ torch.randn(H.shape[0], device=H.device)
    model.zero_grad(set_to_none=True)


# -- one configuration in a fresh process -------------------------------------------------


def worker(key: str, n: int, device: torch.device) -> dict:
    model, loader = make_problem(n, device)
    one_batch_warmup(key, model, loader)
    run = pyhessian_eigen if key == "pyhessian" else hesse_eigen
    gc.collect()
    malloc_trim()
    growth = peak_meter(device)
    start = time.perf_counter()
    out = run(model, loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_peak_bytes": growth(), **out}


# -- the product, checked ---------------------------------------------------------------


def check_product(device: torch.device) -> float:
    """hesse's product against PyHessian's over the 512-sample problem (same Hessian)."""
    model, loader = make_problem(512, device)
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), loader)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3)).to(device)
    hv = H @ v
    hc = pyhessian_hessian(model, nn.CrossEntropyLoss(), dataloader=loader)
    vs = list(v.split([p.numel() for p in hc.params]))
    _, ref = hc.dataloader_hv_product([t.view_as(p) for t, p in zip(vs, hc.params)])
    model.zero_grad(set_to_none=True)
    ref_flat: Tensor = torch.cat([t.reshape(-1) for t in ref])
    err = float((hv - ref_flat).norm() / ref_flat.norm())
    if not err < HVP_TOLERANCE:
        raise RuntimeError(f"hesse's product differs from PyHessian's: rel. error {err:.1e}")
    return err
