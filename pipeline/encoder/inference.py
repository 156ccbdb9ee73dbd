"""The one inference loop of the classifier: ``finetune``'s predictions and the served model.

Lightning-free (torch only), so the served model runs exactly the loop that wrote the
pipeline's ``transformer`` predictions, and the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from pipeline.encoder.model import Classifier, model_inputs
from pipeline.errors import PipelineError

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Lightning precisions that predict under autocast; any other runs in the weights' dtype."""


@torch.inference_mode()
def predict_logits(
    model: Classifier,
    batches: Iterable[dict[str, Tensor]],
    device: torch.device | None = None,
    precision: str = "32-true",
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, float64 logits) for every document of ``batches`` (collated by
    :class:`pipeline.encoder.collate.ClassifyCollator`), in order.

    ``model`` must already be in eval mode (dropout off) and on ``device``: the caller
    decides whether to copy it (training) or to reuse it per request (serving).
    """
    if model.training:
        raise PipelineError("predict_logits: the model is in training mode (call .eval())")
    device = device or torch.device("cpu")
    dtype = AUTOCAST_DTYPES.get(precision)
    indices, logits = [], []
    for batch in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(**model_inputs(batch, device))
        indices.append(batch["index"].numpy())
        logits.append(out.double().cpu().numpy())
    return np.concatenate(indices), np.concatenate(logits)
