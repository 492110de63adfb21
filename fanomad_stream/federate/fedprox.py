"""Client side of FedProx: the proximal term added to the local loss."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn


def snapshot_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached copy of the model's trainable parameters, keyed by name.

    Take it right after loading the global weights, before the first optimizer step, and
    pass it to ``proximal_term`` for the whole local training run.
    """
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def proximal_term(
    model: nn.Module, global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """Return ``mu / 2 * ||w - w_global||²`` summed over the model's trainable parameters.

    Gradients flow into the model's parameters only: ``global_params`` is detached here even
    if the caller passed tensors that require gradients, so its gradient with respect to
    a parameter ``w`` is ``mu * (w - w_global)``. With ``mu == 0`` the term is an exact zero
    and adds nothing to the loss or to any gradient, so training matches FedAvg bit for bit.

    Parameters
    ----------
    model
        The local model being trained.
    global_params
        The global weights this round started from, as from ``snapshot_parameters``.
    mu
        Weight of the proximal term, >= 0. Larger values keep the local model nearer the
        global one.

    Raises
    ------
    ValueError
        If ``mu`` is negative or not finite, or ``global_params`` lacks a trainable
        parameter of the model or has it with another shape.
    """
    if not mu >= 0 or not math.isfinite(mu):
        msg = f"mu must be a finite number >= 0, got {mu!r}"
        raise ValueError(msg)
    squared = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in global_params:
            msg = f"global_params lacks parameter {name!r}; build it with snapshot_parameters"
            raise ValueError(msg)
        anchor = global_params[name].detach()
        if anchor.shape != param.shape:
            msg = (
                f"global_params[{name!r}] has shape {tuple(anchor.shape)}, the model has "
                f"{tuple(param.shape)}"
            )
            raise ValueError(msg)
        squared.append((param - anchor).pow(2).sum())
    if not squared:
        msg = "model has no trainable parameters, so a proximal term is meaningless"
        raise ValueError(msg)
    return 0.5 * mu * torch.stack(squared).sum()
