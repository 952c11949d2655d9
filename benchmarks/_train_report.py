"""The figure and the result file's curves of ``train.py`` (which describes the method):
(a) the relative gap to the optimum against time, (b) the training loss and the test
accuracy against time; :func:`thin` cuts the curves for the JSON file.
"""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    colors = plt.get_cmap("tab20").colors

    def style(i: int, name: str) -> dict:
        hesse_run = name.startswith("hesse")
        return {"color": colors[(2 * i) % 20 + (i // 10) % 2], "lw": 1.6 if hesse_run else 1.2,
                "ls": "-" if hesse_run else "--"}  # fmt: skip

    a = result["a"]
    for i, (name, r) in enumerate(a["runs"].items()):
        pts = [
            (t, max((v - a["f_star"]) / a["f_star"], 1e-16)) for t, v in zip(r["time"], r["loss"])
        ]
        pts = [(t, g) for t, g in pts if t > 0]
        axes[0].loglog(*zip(*pts), label=name, **style(i, name))
    axes[0].axhline(target, color="k", ls=":", lw=1)
    axes[0].set(
        xlabel="wall-clock time (s, log)",
        ylabel="(f - f*) / f*  (log)",
        title="(a) digits logistic regression, full batch\n(dotted: the 1e-6 target)",
    )
    b = result["b"]["curves"]
    for i, (name, r) in enumerate(b.items()):
        axes[1].semilogy(r["time"], r["loss"], label=name, alpha=0.7, **style(i, name))
        axes[2].plot(r["time"], r["test"], label=name, alpha=0.7, **style(i, name))
    axes[1].set(xlabel="wall-clock time (s)", ylabel="training loss, all training data (log)",
                title="(b) MLP 64-128-10 on digits, batches of 128")  # fmt: skip
    axes[2].set(xlabel="wall-clock time (s)", ylabel="test accuracy", ylim=(0.9, 1.0),
                title="(b) test accuracy (held-out 25%)")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(1.1, -0.13), ncol=3)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.33, wspace=0.28)
    fig.savefig(path, dpi=120)


def thin(obj, keep: int = 300):
    """The result with each curve (a list of numbers) cut to at most ``keep`` points, the
    last one kept, for a JSON file of reasonable size (the figure uses every point)."""
    if isinstance(obj, dict):
        return {k: thin(v, keep) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > keep and all(isinstance(v, (int, float)) for v in obj):
        step = -(-len(obj) // keep)
        return obj[::step] + ([obj[-1]] if (len(obj) - 1) % step else [])
    return obj
