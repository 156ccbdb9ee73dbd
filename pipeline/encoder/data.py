"""The LM collator and the Lightning datamodule over the splits of
:mod:`pipeline.encoder.tokens`.

Randomness (LM windows and MLM masks) comes from torch's RNG: the global one in training,
which Lightning's ``seed_everything(workers=True)`` and the loader's seeded generator make
repeatable in every worker, and a per-batch generator derived from the first document's
index when a fixed ``seed`` is given (validation), so the held-out loss is measured on
the same masks at every evaluation and for any number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pipeline.domain import MASK_ID, N_SPECIAL
from pipeline.encoder.collate import ClassifyCollator, Example, pad_sequences, wrap
from pipeline.encoder.tokens import DocumentTokens

IGNORE = -100  # label of positions that carry no MLM loss


def _generator(seed: int | None, batch: list[Example]) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed * 1_000_003 + batch[0].index)


def mask_tokens(
    input_ids: Tensor, vocab_size: int, rate: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """BERT-style dynamic masking: returns (masked inputs, labels with -100 elsewhere).

    Each content token (id >= N_SPECIAL) is chosen with probability ``rate``; chosen
    tokens become [MASK] 80% of the time, a random content token 10%, unchanged 10%.
    Special and pad tokens are never chosen. At least one token per batch is chosen when
    any content token exists, so the loss is always defined.
    """
    candidates = input_ids >= N_SPECIAL
    chosen = (torch.rand(input_ids.shape, generator=generator) < rate) & candidates
    if not chosen.any() and candidates.any():
        first = candidates.reshape(-1).nonzero()[0]
        chosen.view(-1)[first] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(N_SPECIAL, vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


def next_token_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Causal-LM labels: position t is labelled with token t + 1 (-100 where that is
    padding or past the end), so the loss never asks a position to predict itself."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(attention_mask[:, 1:], input_ids[:, 1:], IGNORE)
    return labels


@dataclass
class LMCollator:
    """Random windows of ``max_len - 2`` tokens from each document, wrapped, then masked
    (``objective="mlm"``) or labelled with the next token (``"clm"``)."""

    max_len: int
    vocab_size: int
    mask_rate: float = 0.15
    seed: int | None = None  # fixed windows and masks (validation); None: training RNG
    objective: Literal["mlm", "clm"] = "mlm"

    def __call__(self, batch: list[Example]) -> dict[str, Tensor]:
        gen = _generator(self.seed, batch)
        body = self.max_len - 2
        seqs = []
        for ex in batch:
            n = len(ex.tokens)
            start = int(torch.randint(0, n - body + 1, (1,), generator=gen)) if n > body else 0
            seqs.append(wrap(ex.tokens[start : start + body]))
        ids, attention_mask = pad_sequences(seqs)
        if self.objective == "clm":
            labels = next_token_labels(ids, attention_mask)
            return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
        masked, labels = mask_tokens(ids, self.vocab_size, self.mask_rate, gen)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch: epoch e's order depends only on (seed, e).

    Lightning calls :meth:`set_epoch` before each training epoch, so a run resumed from an
    end-of-epoch checkpoint draws the same order as an uninterrupted one (a generator
    created once and advanced epoch by epoch would start over after a restart).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class TokenizedDataModule(L.LightningDataModule):
    """Train/validation loaders over ``data/tokenized`` with the given collators.

    Splits are passed in already loaded (:func:`load_splits`), so the stage validates its
    inputs once, before any process is launched. The train loader shuffles with
    :class:`EpochShuffle` (seeded by ``seed`` and the epoch); under DDP Lightning wraps it
    in a distributed sampler seeded from the global seed.
    """

    def __init__(
        self,
        splits: dict[str, DocumentTokens],
        *,
        train_collate: LMCollator | ClassifyCollator,
        eval_collate: LMCollator | ClassifyCollator,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.train_collate = train_collate
        self.eval_collate = eval_collate
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.drop_last = drop_last

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        data = self.splits[split]
        return DataLoader(
            data,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochShuffle(len(data), self.seed) if train else None,
            drop_last=train and self.drop_last,
            collate_fn=self.train_collate if train else self.eval_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator draws a worker seed from it, which
            # must not advance the global RNG (resumed runs create them at other times)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def eval_loader(self, split: str) -> DataLoader:
        """A plain in-order loader for predicting a split after training."""
        return self._loader(split, train=False)
