"""A compact transformer encoder on plain torch modules, its MLM head and the classifier.

Plain modules rather than a model library keep every shape and default visible and let
the same weights move between pretraining (:class:`LanguageModel`) and fine-tuning
(:class:`Classifier`) through one ``state_dict`` prefix (``encoder.``).

How the classifier sees a long document (``finetune.long_doc``, implemented by the
collator in :mod:`pipeline.encoder.collate`; the model only pools):

- ``chunk``: the document is cut into consecutive chunks of ``max_len - 2`` tokens, each
  wrapped in ``[CLS] ... [SEP]`` and encoded independently (at most ``max_chunks`` per
  document); each chunk is pooled (mean over its tokens or its ``[CLS]``), then the chunk
  vectors are mean- or max-pooled into one document vector. Sees the most text at a cost
  linear in document length.
- ``head_tail``: one sequence of the first and last tokens (the head keeps the
  newsgroup headers and opening, the tail the signature and conclusion).
- ``head``: plain truncation to the first ``max_len - 2`` tokens.

Encoder tensors: ``input_ids`` (N, T) int64, ``attention_mask`` (N, T) bool, True on real
tokens. Padding is on the right; padded positions never influence real ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.config import Section
from pipeline.errors import PipelineError
from pipeline.io import write_json

Positions = Literal["learned", "rotary"]
Objective = Literal["mlm", "clm"]
TokenPooling = Literal["mean", "max", "cls"]
ChunkPooling = Literal["mean", "max"]


class ModelParams(Section):
    """The ``model`` params section: the encoder's shape (the vocabulary comes from the
    tokenizer)."""

    d_model: int = Field(ge=1, description="Width of the token vectors (divisible by n_heads).")
    n_layers: int = Field(ge=1, description="Transformer blocks.")
    n_heads: int = Field(ge=1, description="Attention heads per block.")
    d_ff: int = Field(ge=1, description="Hidden width of each block's feed-forward layer.")
    dropout: float = Field(
        ge=0.0,
        lt=1.0,
        description="Dropout inside the encoder (finetune.encoder_dropout "
        "overrides it when fine-tuning).",
    )
    max_len: int = Field(
        ge=4,
        description="Longest sequence the encoder sees, [CLS] and [SEP] included (the window "
        "and chunk length).",
    )
    positions: Positions = Field(
        description="Position encoding: learned (a table of max_len vectors) or rotary "
        "(relative, in attention)."
    )

    @model_validator(mode="after")
    def _check_shape(self) -> ModelParams:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model/n_heads: d_model={self.d_model} is not divisible by "
                f"n_heads={self.n_heads}"
            )
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError("positions: rotary positions need an even d_model / n_heads")
        return self


class Rotary(nn.Module):
    """Rotary position embedding (half-split form) applied to queries and keys."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape (N, H, T, head_dim) by its positions 0..T-1."""
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, p: ModelParams, rotary: Rotary | None) -> None:
        super().__init__()
        self.n_heads = p.n_heads
        self.dropout = p.dropout
        self.rotary = rotary
        self.norm1 = nn.LayerNorm(p.d_model)
        self.qkv = nn.Linear(p.d_model, 3 * p.d_model)
        self.proj = nn.Linear(p.d_model, p.d_model)
        self.norm2 = nn.LayerNorm(p.d_model)
        self.ff_in = nn.Linear(p.d_model, p.d_ff)
        self.ff_out = nn.Linear(p.d_ff, p.d_model)
        self.drop = nn.Dropout(p.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(n, t, d)))
        return x + self.drop(self.ff_out(F.gelu(self.ff_in(self.norm2(x)))))


class Encoder(nn.Module):
    """Token embedding (+ learned positions), pre-norm blocks and a final norm."""

    def __init__(self, p: ModelParams, vocab_size: int) -> None:
        super().__init__()
        self.params = p
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, p.d_model)
        self.pos_emb = nn.Embedding(p.max_len, p.d_model) if p.positions == "learned" else None
        rotary = Rotary(p.d_model // p.n_heads, p.max_len) if p.positions == "rotary" else None
        self.emb_drop = nn.Dropout(p.dropout)
        self.blocks = nn.ModuleList(Block(p, rotary) for _ in range(p.n_layers))
        self.norm = nn.LayerNorm(p.d_model)
        self.apply(_init_weights)
        # GPT-2 style: scale residual output projections by depth so activations stay O(1).
        for block in self.blocks:
            for lin in (block.proj, block.ff_out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * p.n_layers))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, causal: bool = False) -> Tensor:
        """Hidden states (N, T, d_model) for ``input_ids`` (N, T) with a bool padding mask;
        ``causal``: position t attends to positions <= t only (causal-LM pretraining)."""
        t = input_ids.shape[1]
        if t > self.params.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.params.max_len}")
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:t]
        x = self.emb_drop(x)
        # Keys that are padding are hidden from every query; None lets SDPA take its
        # fastest path when nothing is padded.
        attn_mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :]
        if causal:
            # Right padding: every query still sees position 0, so no row is all-masked.
            past = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            attn_mask = past if attn_mask is None else attn_mask & past
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MLMHead(nn.Module):
    """Dense + GELU + norm, then the vocabulary projection through the tied embedding."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        _init_weights(self.dense)

    def forward(self, hidden: Tensor, embedding: Tensor) -> Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), embedding, self.bias)


class LanguageModel(nn.Module):
    """Encoder + LM head whose output projection is the (tied) token embedding.

    ``objective``: ``mlm`` (bidirectional attention, labels on masked positions) or
    ``clm`` (causal attention, each position labelled with the next token). Either way
    the encoder's weights are what ``finetune`` loads; the classifier always attends
    both ways.
    """

    def __init__(self, p: ModelParams, vocab_size: int, objective: Objective = "mlm") -> None:
        super().__init__()
        self.objective: Objective = objective
        self.encoder = Encoder(p, vocab_size)
        self.head = MLMHead(p.d_model, vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the positions whose label is not -100.

        The vocabulary projection runs only on those positions (the masked ones for MLM),
        so its cost follows the predicted tokens, not the sequence length.
        """
        hidden = self.encoder(input_ids, attention_mask, causal=self.objective == "clm")
        selected = labels != -100
        logits = self.head(hidden[selected], self.encoder.tok_emb.weight)
        if logits.shape[0] == 0:  # nothing masked: a zero loss that keeps the graph (DDP)
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels[selected])


def pool_tokens(hidden: Tensor, attention_mask: Tensor, mode: TokenPooling) -> Tensor:
    """One vector per sequence: the mean or the elementwise max over real tokens, or the
    first ([CLS]) token. Max keeps a strong feature of a few tokens (a rare, telling word)
    from being averaged away in a long window."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        pad = ~attention_mask.unsqueeze(-1)
        return hidden.masked_fill(pad, torch.finfo(hidden.dtype).min).amax(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def pool_chunks(chunks: Tensor, chunk_mask: Tensor, mode: ChunkPooling) -> Tensor:
    """One vector per document from its chunk vectors.

    ``chunks`` (N, d) holds the real chunks in row-major order of ``chunk_mask`` (B, C),
    which is True where document b has a chunk c. Scattering into a padded (B, C, d) grid
    by a boolean mask is deterministic on every device, unlike index_add/scatter_reduce.
    """
    b, c = chunk_mask.shape
    grid = chunks.new_zeros(b * c, chunks.shape[-1])
    grid[chunk_mask.reshape(-1)] = chunks
    grid = grid.view(b, c, -1)
    mask = chunk_mask.unsqueeze(-1)
    if mode == "max":
        return grid.masked_fill(~mask, torch.finfo(grid.dtype).min).amax(1)
    m = mask.to(grid.dtype)
    return (grid * m).sum(1) / m.sum(1).clamp(min=1.0)


class Classifier(nn.Module):
    """Encoder, token pooling, chunk pooling, dropout and a linear head.

    The encoder alone: the linear bag-of-tokens model is its own stage (``wide``,
    :mod:`pipeline.bag`) and the two meet only in ``blend``, so this model's predictions
    say what the encoder is worth.
    """

    def __init__(
        self,
        p: ModelParams,
        vocab_size: int,
        n_classes: int,
        *,
        pooling: TokenPooling = "mean",
        chunk_pooling: ChunkPooling = "mean",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(p, vocab_size)
        self.pooling: TokenPooling = pooling
        self.chunk_pooling: ChunkPooling = chunk_pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(p.d_model, n_classes)
        _init_weights(self.head)

    def embed(self, input_ids: Tensor, attention_mask: Tensor, chunk_mask: Tensor) -> Tensor:
        """Document vectors (B, d_model) from the chunks of a batch."""
        hidden = self.encoder(input_ids, attention_mask)
        return pool_chunks(
            pool_tokens(hidden, attention_mask, self.pooling), chunk_mask, self.chunk_pooling
        )

    def classify(self, doc: Tensor) -> Tensor:
        """Class logits (B, n_classes) from document vectors."""
        return self.head(self.drop(doc))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, chunk_mask: Tensor) -> Tensor:
        """Class logits (B, n_classes)."""
        return self.classify(self.embed(input_ids, attention_mask, chunk_mask))


MODEL_INPUTS = ("input_ids", "attention_mask", "chunk_mask")  # Classifier.forward's inputs


def model_inputs(batch: dict[str, Tensor], device: torch.device | None = None) -> dict[str, Tensor]:
    """The keyword arguments of :meth:`Classifier.forward` found in a collated batch."""
    return {k: batch[k].to(device) if device else batch[k] for k in MODEL_INPUTS}


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Parameter counts (tied weights counted once): total, trainable and per top-level
    part, with the token embedding reported separately because it dominates small models."""
    counts: dict[str, int] = {
        "total": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }
    seen: set[int] = set()
    for name, param in module.named_parameters():  # named_parameters skips tied duplicates
        if id(param) in seen:
            continue
        seen.add(id(param))
        part = name.split(".")[0]
        if part == "encoder":
            sub = name.split(".")[1]
            part = f"encoder.{'blocks' if sub == 'blocks' else sub}"
        counts[part] = counts.get(part, 0) + param.numel()
    return counts


def format_parameter_counts(counts: dict[str, int]) -> str:
    """One line such as ``7.31M parameters (trainable 7.31M; encoder.tok_emb 4.10M, ...)``."""

    def m(n: int) -> str:
        return f"{n / 1e6:.2f}M"

    parts = ", ".join(f"{k} {m(v)}" for k, v in counts.items() if k not in ("total", "trainable"))
    return f"{m(counts['total'])} parameters (trainable {m(counts['trainable'])}; {parts})"


WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model(model: nn.Module, directory: str | Path, config: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (the full state dict) and ``config.json`` into a
    directory (normally a temporary one from :func:`pipeline.io.atomic_outputs`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, config)


def load_model_files(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, state dict) of a directory written by :func:`save_model`."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        state = load_file(str(directory / WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise PipelineError(f"{directory}: {Path(exc.filename).name} not found") from None
    return config, state


def encoder_config(p: ModelParams, vocab_size: int, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` content describing an encoder (plus head-specific keys)."""
    return {"model": p.model_dump(), "vocab_size": vocab_size, **extra}


def load_pretrained_encoder(
    model: Classifier, p: ModelParams, vocab_size: int, directory: Path
) -> None:
    """Load the encoder weights of the language model saved in ``directory`` into ``model``.

    Raises:
        PipelineError: the saved encoder's shape (its ``model`` section but ``dropout``,
            or its vocabulary size) differs from ``p`` and ``vocab_size``.
    """
    config, state = load_model_files(directory)
    theirs = {k: v for k, v in config.get("model", {}).items() if k != "dropout"}
    ours = {k: v for k, v in p.model_dump().items() if k != "dropout"}
    if theirs != ours or config.get("vocab_size") != vocab_size:
        raise PipelineError(
            f"{directory}: pretrained encoder {theirs} (vocab {config.get('vocab_size')}) "
            f"does not match the model section {ours} (vocab {vocab_size}); rerun pretrain "
            "or set finetune.init=scratch"
        )
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k[:8] == "encoder."}
    model.encoder.load_state_dict(encoder_state, strict=True)
