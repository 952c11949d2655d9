"""The README's `make demo` example runs and says what it should."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_example_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "logistic_spectrum.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    text = out.stdout
    assert "verdict at the optimum: positive definite" in text
    diff = float(text.split("largest difference from the dense eigh: ")[1].split()[0])
    assert diff < 1e-8
    gap = float(text.split("|G v - H v| / |H v| = ")[1].split()[0])
    assert gap < 1e-10


def test_readme_gives_the_two_commands_first():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    blocks = [b[len("python\n") :] for b in readme.split("```")[1::2] if b.startswith("python\n")]
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # figures land here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "density.png").exists()
