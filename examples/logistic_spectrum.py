"""The Hessian of logistic regression on scikit-learn's breast-cancer data.

Fits L2-regularised logistic regression with scikit-learn, then, at its optimum, builds
hesse's Hessian operator of the mean loss, finds the top and bottom eigenvalues without
forming the matrix (``hesse.eigenvalues``: Lanczos with certified residuals), checks them
against the dense Hessian, and gives hesse's convexity verdict there.

Run: ``make demo`` (or ``python examples/logistic_spectrum.py``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

import hesse


def main() -> None:
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    n, d = X.shape
    C = 1.0
    clf = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(X, y)

    # The same model in torch: mean BCE + (1 / (2 C n)) |w|^2 is sklearn's objective / (C n).
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(clf.coef_))
        model.bias.copy_(torch.as_tensor(clf.intercept_))
    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y, dtype=torch.float64).unsqueeze(1)
    data = (Xt, yt)
    loss_fn = nn.BCEWithLogitsLoss()

    H_data = hesse.HessianOperator(model, loss_fn, data)
    lam = 1.0 / (C * n)
    reg = torch.ones(d + 1, dtype=torch.float64)
    reg[-1] = 0.0  # the intercept is not penalised
    H = H_data + hesse.DenseOperator(torch.diag(lam * reg), psd=True)
    print(f"breast cancer: n = {n} samples, d = {d} features; Hessian of size {H.shape}")

    t0 = time.perf_counter()
    ends = hesse.eigenvalues(H, k=5, which="both", tol=1e-10, seed=0)
    t_lanczos = time.perf_counter() - t0
    bottom, top = ends.eigenvalues[:5].numpy(), ends.eigenvalues[5:].numpy()
    dense = torch.linalg.eigvalsh(H.to_dense()).numpy()
    print(
        f"top 5 eigenvalues (Lanczos, {ends.matvecs} products, {t_lanczos:.2f}s): "
        + ", ".join(f"{v:.6g}" for v in top)
    )
    print("bottom 3 eigenvalues: " + ", ".join(f"{v:.6g}" for v in bottom[:3]))
    print(f"largest certified residual: {float(ends.residuals.max()):.1e}")
    err = max(np.max(np.abs(top - dense[::-1][:5])), np.max(np.abs(bottom - dense[:5])))
    print(f"largest difference from the dense eigh: {err:.2e}")
    print(f"condition number: {top[0] / bottom[0]:.4g}")
    report = hesse.convexity(H)
    print(f"verdict at the optimum: {str(report.verdict).replace('_', ' ')}")

    # For a linear model with the logistic loss the Gauss-Newton matrix is the Hessian.
    G = hesse.GGNOperator(model, loss_fn, data)
    v = torch.randn(d + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gap = float(torch.linalg.vector_norm(G @ v - H_data @ v) / torch.linalg.vector_norm(H_data @ v))
    print(f"|G v - H v| / |H v| = {gap:.1e} (GGN = Hessian for logistic regression)")


if __name__ == "__main__":
    main()
