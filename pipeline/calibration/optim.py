"""Full-batch L-BFGS in float64: the optimiser of every scaling calibrator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.metrics import torch_single_thread


def lbfgs(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], max_iter: int) -> None:
    """Minimise ``loss_fn`` over ``params`` in place with full-batch L-BFGS.

    Uses a strong-Wolfe line search on one CPU thread, so the result is deterministic.

    Args:
        params: The tensors to optimise (``requires_grad``), updated in place.
        loss_fn: Computes the loss from the current ``params``.
        max_iter: The most L-BFGS iterations.

    Raises:
        PipelineError: A parameter ended non-finite (the fit diverged).
    """
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch_single_thread():
        opt.step(closure)
    for p in params:
        if not torch.all(torch.isfinite(p)):
            raise PipelineError("calibrator fit diverged (non-finite parameters)")


def as_tensors(logits: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked float64 logits and int64 labels as tensors that share their memory."""
    return torch.from_numpy(logits), torch.from_numpy(labels)
