"""The trained classifier's predictions as the pipeline's logits table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.domain import PREDICTION_SPLITS
from pipeline.encoder.data import TokenizedDataModule
from pipeline.encoder.model import Classifier
from pipeline.encoder.params import Precision
from pipeline.encoder.tokens import DocumentTokens
from pipeline.encoder.trainer import predict_logits
from pipeline.predictions import make_table
from pipeline.schemas import Predictions, validate


def logits_table(
    model: Classifier,
    data: TokenizedDataModule,
    splits: dict[str, DocumentTokens],
    device: torch.device,
    precision: Precision,
) -> pd.DataFrame:
    """The validated logits table (:class:`pipeline.schemas.Predictions`) of ``model`` on
    every prediction split of ``data``, split by split, rows in each split's order."""
    ids, split_names, labels, values = [], [], [], []
    for split in PREDICTION_SPLITS:
        index, split_logits = predict_logits(model, data.eval_loader(split), device, precision)
        ids += [splits[split].ids[i] for i in index]
        split_names += [split] * len(index)
        labels.append(splits[split].labels[index])
        values.append(split_logits)
    table = make_table(ids, split_names, np.concatenate(labels), np.concatenate(values))
    return validate(table, Predictions, "finetune predictions")
