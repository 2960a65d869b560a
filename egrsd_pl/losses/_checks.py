"""Argument checks shared by the loss functions; each raises ``ValueError`` naming the argument.

The one home of each bound: :class:`~egrsd_pl.losses.gate.GateConfig` calls the same checks with the
command-line flag as the name (``--model.gamma``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_bool_mask(mask: Tensor, *, shape: tuple[int, ...], name: str = "mask") -> None:
    """Require a boolean tensor of the given shape."""
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a boolean tensor, got dtype {mask.dtype}")
    check_shape(mask, shape, name)


def check_shape(tensor: Tensor, shape: tuple[int, ...], name: str) -> None:
    """Require ``tensor.shape == shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_ndim(tensor: Tensor, ndim: int, name: str) -> None:
    """Require a tensor with ``ndim`` dimensions."""
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")


def check_gamma(gamma: float, name: str = "gamma") -> None:
    """The entropy penalty strength ``γ`` of the confidence gate: ``γ >= 0``."""
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {gamma!r}")


def check_window(window: int, name: str = "window") -> None:
    """The causal window ``W`` of CL-EGRSD: an integer ``>= 0`` (0 disables it)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {window!r}")


def check_eps(eps: float) -> None:
    """The magnitude clip ``ε``: ``0 < ε < 1``."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")


def check_omega_floor(omega_floor: float, name: str = "omega_floor") -> None:
    """The lower clip of the confidence gate ``ω``: ``0 <= omega_floor <= 1`` (0: no floor; 1: ``ω = 1``)."""
    if not 0 <= omega_floor <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {omega_floor!r}")


def check_entropy_max(entropy_max: float | Tensor | None) -> None:
    """An already-reduced batch maximum: a number ``>= 0`` or a one-element tensor (not read back)."""
    if entropy_max is None:
        return
    if isinstance(entropy_max, Tensor):
        if entropy_max.numel() != 1:
            raise ValueError(
                f"entropy_max must be a one-element tensor, got shape {tuple(entropy_max.shape)}"
            )
    elif not entropy_max >= 0:
        raise ValueError(f"entropy_max must be >= 0, got {entropy_max}")


def check_chunk_size(chunk_size: int, name: str) -> None:
    """A block size (positions or vocabulary rows): an integer ``>= 1``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {chunk_size!r}")
