"""Domain constants: the one place the dataset's classes, splits and fixed ids are written.

Plain Python on purpose (no pandera, torch or Lightning): the served model, the schemas,
the stages and the encoder all import these, so a constant changed here changes everywhere
at once, and importing it costs nothing.
"""

from __future__ import annotations

from typing import Protocol

# The 20 groups of 20 Newsgroups; a label is the index of its group in this sorted list.
GROUPS: tuple[str, ...] = (
    "alt.atheism",
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "rec.sport.baseball",
    "rec.sport.hockey",
    "sci.crypt",
    "sci.electronics",
    "sci.med",
    "sci.space",
    "soc.religion.christian",
    "talk.politics.guns",
    "talk.politics.mideast",
    "talk.politics.misc",
    "talk.religion.misc",
)
NUM_CLASSES = len(GROUPS)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
PREDICTION_SPLITS: tuple[str, ...] = ("validation", "test")
"""The splits a model stage predicts: calibrators fit on validation, test is only scored."""
# Documents in the complete bydate archive; validation is carved out of train.
FULL_SPLIT_SIZES: dict[str, int] = {"train+validation": 11314, "test": 7532}
DOCUMENT_ID_PATTERN = r"^(train|test)/[^/]+/[^/]+$"
"""A document id: the archive folder it came from (train or test), its group, its file."""

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
"""Model names (``data/predictions/<model>``, metrics rows), registry and config names:
safe as a folder name, an MLflow name and a DVC param value."""

LOGIT_COLUMNS: tuple[str, ...] = tuple(f"logit_{j}" for j in range(NUM_CLASSES))
PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{j}" for j in range(NUM_CLASSES))
PROB_ATOL = 1e-6
"""How far a probability may stray outside [0, 1], or a row sum from 1, before we refuse."""

# Fixed by the tokenize stage (trained with these first); the model stages, their
# collators and the served model depend on the ids.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
N_SPECIAL = len(SPECIAL_TOKENS)
"""Ids below this are never masked, predicted or drawn as random replacements."""


class _Vocabulary(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


def special_token_mismatch(tokenizer: _Vocabulary) -> str | None:
    """Why ``tokenizer`` (a ``tokenizers.Tokenizer``) does not give the special tokens their
    fixed ids, or None when it does: a tokenizer from elsewhere would shift every id."""
    for expected, token in enumerate(SPECIAL_TOKENS):
        found = tokenizer.token_to_id(token)
        if found != expected:
            return f"special token {token} has id {found}, expected {expected}"
    return None
