"""Validation helpers. Every error names what was expected and what was received."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError, ValueError):
    """A value that must be finite (an input vector, a loss, a product) is not."""


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}"
    return f"{type(x).__name__}"


def all_finite(*xs: Tensor) -> bool:
    """Whether every tensor is finite, with one reduction per tensor and one host sync.
    (The tensors must share a device.)

    The sum of a tensor is finite when all its entries are (a NaN or an infinity makes it
    NaN or infinite); only if a sum is not finite, which a sum of huge finite values can
    also be, are the entries looked at one by one.
    """
    total = xs[0].sum()
    for x in xs[1:]:
        total = total + x.sum()  # a NaN or infinity anywhere makes the total non-finite
    if bool(torch.isfinite(total)):
        return True
    return all(bool(torch.isfinite(x).all()) for x in xs)


def check_finite(x: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds a NaN or an infinity."""
    if not all_finite(x):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteError(
            f"{what} must be finite, but it holds {n_nan} NaN and {n_inf} infinite value(s)"
        )


def check_scalar(value: object, what: str = "the loss") -> Tensor:
    """Check that a function returned a real scalar tensor (shape ``()`` or ``(1,)``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a scalar torch.Tensor, got {_describe(value)}")
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(
            f"{what} must be a scalar (shape () ), got shape {tuple(value.shape)}; "
            "use a loss with reduction='mean' or 'sum', or reduce it yourself"
        )
    if not value.is_floating_point():
        raise TypeError(f"{what} must be floating point, got dtype {value.dtype}")
    return value.reshape(())


def check_operand(
    v: object,
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    what: str = "the vector",
    check_values: bool = True,
) -> tuple[Tensor, bool]:
    """Check the right-hand side of ``A @ v`` for an operator of shape ``(size, size)``.

    Returns ``(V, is_vector)``: ``V`` of shape ``(size, k)`` (a view, never a copy of the
    caller's data that is then written to), and whether ``v`` was a vector of shape ``(size,)``.
    With ``check_values=False`` the caller checks finiteness itself (see
    :class:`hesse.operators.CurvatureOperator`, which checks operand and result together).
    """
    if not isinstance(v, Tensor):
        raise TypeError(
            f"{what} must be a torch.Tensor of shape ({size},) or ({size}, k), got {_describe(v)}"
        )
    if v.dim() not in (1, 2) or v.shape[0] != size:
        raise ValueError(
            f"{what} must have shape ({size},) or ({size}, k), got shape {tuple(v.shape)}"
        )
    if v.dtype != dtype:
        raise TypeError(
            f"{what} must have the operator's dtype {dtype}, got {v.dtype}; "
            f"convert it with v.to({dtype})"
        )
    if v.device != device:
        raise ValueError(f"{what} must be on the operator's device {device}, got {v.device}")
    if check_values:
        check_finite(v, what)
    if v.dim() == 1:
        return v.unsqueeze(1), True
    return v, False


def check_real(
    value: object,
    name: str,
    lo: float = 0.0,
    hi: float = math.inf,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
) -> float:
    """Check that ``value`` is a finite real number (not a bool) in the interval from ``lo``
    to ``hi`` (closed unless ``open_lo`` / ``open_hi``); return it as a float.

    A NaN fails every comparison, so a tolerance of NaN would otherwise pass as "no
    tolerance" or "any tolerance" silently; it is refused here with the rest.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    if not ok:
        if hi == math.inf:
            where = f"{'>' if open_lo else '>='} {lo:g}"
        else:
            left, right = "(" if open_lo else "[", ")" if open_hi else "]"
            where = f"in {left}{lo:g}, {hi:g}{right}"
        raise ValueError(f"{name} must be a finite real number {where}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_seed(seed: object, name: str = "seed", *, allow_none: bool = True) -> int | None:
    """Check a random seed: an integer (a Python or NumPy integer, not a bool) in
    ``[0, 2**63)``, or ``None`` (fresh randomness) where ``allow_none``; return it as an int.

    A float is refused rather than truncated (``1.7`` would silently seed as ``1``), and a
    value outside the range rather than left to torch's ``Overflow when unpacking long``.
    """
    if seed is None and allow_none:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        expected = "an integer or None" if allow_none else "an integer"
        raise TypeError(f"{name} must be {expected}, got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {int(seed)}")
    return int(seed)


def check_int(value: object, name: str, lo: int = 1, hi: int | None = None) -> int:
    """Check a count: an integer (a Python or NumPy integer, never a bool or a float) in
    ``[lo, hi]``; return it as an int. Raises ``ValueError`` naming ``name``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and int(value) >= lo and (hi is None or int(value) <= hi)  # type: ignore[arg-type]
    if not ok:
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {where}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_generator(generator: object, name: str = "generator") -> None:
    """Check an optional ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None (use seed= for an integer seed), got "
            f"{type(generator).__name__} {generator!r}"
        )


def derive_seed(seed: object, *stream: int | str) -> int:
    """The seed of one stream of random draws, derived from a user's ``seed``: the same
    ``(seed, *stream)`` gives the same result in every process, on every platform and in
    every Python session, in ``[0, 2**63)`` (what ``torch.Generator.manual_seed`` takes);
    distinct streams give unrelated seeds (a collision has probability about ``2**-63``).

    ``stream`` names the purpose and the place of the draws, as strings and integers (a
    label, then a step or a rank): ``derive_seed(seed, "hutchinson", step)``. One rule for
    every derived seed, instead of a magic prime per call site, whose streams meet (with
    ``seed + 7919 t`` for one purpose and ``seed + 104729 t`` for another, step
    ``104729 k`` of the first draws what step ``7919 k`` of the second draws). The value
    is 63 bits of the BLAKE2b hash of an unambiguous encoding of the integers and strings.

    Example:
        >>> derive_seed(0, "hutchinson", 3) == derive_seed(0, "hutchinson", 3)
        True
        >>> derive_seed(0, "hutchinson", 3) != derive_seed(0, "hutchinson", 4)
        True
        >>> 0 <= derive_seed(2**63 - 1, "rank", 1) < 2**63
        True
    """
    import hashlib

    seed = check_seed(seed, allow_none=False)
    parts = [b"i%d;" % seed]
    for i, item in enumerate(stream):
        if isinstance(item, str):
            data = item.encode("utf-8")
            parts.append(b"s%d:" % len(data) + data)
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            parts.append(b"i%d;" % int(item))
        else:
            raise TypeError(
                f"stream[{i}] must be a str or an int (a label, a step, a rank), got "
                f"{type(item).__name__} {item!r}"
            )
    digest = hashlib.blake2b(b"".join(parts), digest_size=8, person=b"hesse-seed").digest()
    return int.from_bytes(digest, "little") >> 1
