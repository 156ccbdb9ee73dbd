"""pandera schemas for the tables that cross stage boundaries.

Each stage validates what it reads and what it writes. Validation is lazy: every failure
is collected and reported at once, as a short table a person can read.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from pipeline.domain import (
    DOCUMENT_ID_PATTERN,
    GROUPS,
    LOGIT_COLUMNS,
    NAME_PATTERN,
    NUM_CLASSES,
    PREDICTION_SPLITS,
    PROB_ATOL,
    PROB_COLUMNS,
    SPLITS,
)
from pipeline.errors import PipelineError


class Documents(pa.DataFrameModel):
    """The documents table written by `fetch`: one row per post."""

    id: Series[str] = pa.Field(unique=True, str_matches=DOCUMENT_ID_PATTERN)
    split: Series[str] = pa.Field(isin=list(SPLITS))
    label: Series[int] = pa.Field(ge=0, le=NUM_CLASSES - 1)
    label_name: Series[str] = pa.Field(isin=list(GROUPS))
    text: Series[str] = pa.Field(str_length={"min_value": 1})

    class Config:
        strict = True
        ordered = True

    @pa.dataframe_check(error="label must be the index of label_name in the sorted group list")
    def label_matches_name(cls, df: pd.DataFrame) -> Series[bool]:
        return df["label_name"].map({g: i for i, g in enumerate(GROUPS)}) == df["label"]

    @pa.dataframe_check(
        error="test documents must come from the archive's test folder, "
        "train/validation documents from its train folder"
    )
    def split_matches_origin(cls, df: pd.DataFrame) -> Series[bool]:
        from_test = df["id"].str.startswith("test/")
        return from_test == (df["split"] == "test")


def _split_sizes_check(expected: Mapping[str, int], actual: Mapping[str, int]) -> pa.Check:
    return pa.Check(
        lambda df: _split_sizes(df) == dict(expected),
        error=f"split sizes {dict(actual)}, expected {dict(expected)} for the full dataset",
    )


def _split_sizes(df: pd.DataFrame) -> dict[str, int]:
    test = int((df["split"] == "test").sum())
    return {"train+validation": len(df) - test, "test": test}


def validate(
    df: pd.DataFrame,
    model: type[pa.DataFrameModel],
    where: str,
    expected_sizes: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Validate ``df`` lazily; raise one PipelineError listing every failure.

    ``expected_sizes`` adds a check on the split sizes (documents tables only).
    """
    schema = copy.deepcopy(model.to_schema())
    if expected_sizes is not None:
        schema.checks = [
            *schema.checks,
            _split_sizes_check(expected_sizes, _split_sizes(df)),
        ]
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise PipelineError(format_failures(exc.failure_cases, df, model.__name__, where)) from None


def format_failures(
    cases: pd.DataFrame, df: pd.DataFrame, name: str, where: str, examples: int = 3
) -> str:
    """Summarise pandera failure cases: one line per failed check, with a few examples.

    Table-level checks name the offending rows by ``id`` (when the table has one) instead
    of repeating the check once per column.
    """
    table_level = cases["schema_context"] == "DataFrameSchema"
    cases = cases.assign(
        column=cases["column"].where(~table_level, None).fillna("<table>"),
        failure_case=cases["failure_case"].astype(str),
    )
    if "id" in df.columns:
        rows = cases["index"].where(table_level & cases["index"].notna())
        ids = rows.map(lambda i: str(df["id"].iloc[int(i)]) if pd.notna(i) else None)
        cases["failure_case"] = ids.fillna(cases["failure_case"])
    cases = cases.drop_duplicates(["column", "check", "failure_case", "index"])
    lines = [f"{where}: failed {cases.groupby(['column', 'check']).ngroups} check(s) of {name}:"]
    for (column, check), group in cases.groupby(["column", "check"], sort=False):
        check = check if len(check) <= 120 else check[:117] + "..."
        shown = ", ".join(repr(c) for c in group["failure_case"].head(examples))
        more = f" (+{len(group) - examples} more)" if len(group) > examples else ""
        lines.append(f"  - {column}: {check}: {len(group)} case(s), e.g. {shown}{more}")
    return "\n".join(lines)


class TokenizedSplit(pa.DataFrameModel):
    """One split of the `tokenize` output, without its token lists (checked separately)."""

    id: Series[str] = pa.Field(unique=True)
    label: Series[int] = pa.Field(ge=0, le=NUM_CLASSES - 1)
    length: Series[pa.Int32] = pa.Field(ge=0)

    class Config:
        strict = "filter"


# Prediction tables: what a model stage hands to `calibrate` and `evaluate`. Their per-class
# columns (logit_0 .. logit_19, p_0 .. p_19) are generated from the class list.


def _with_class_columns(
    name: str, keys: type[pa.DataFrameModel], columns: tuple[str, ...], doc: str | None
) -> type[pa.DataFrameModel]:
    """``keys`` followed by one float64 column per class, in class order: the model pandera
    sees is the same as one with every column typed out, without 20 lines to keep in step."""
    annotations = dict.fromkeys(columns, Series[pa.Float64])
    return type(name, (keys,), {"__annotations__": annotations, "__doc__": doc})


class _StrictOrdered(pa.DataFrameModel):
    """Exactly these columns, in this order: a table written in another shape is stale."""

    class Config:
        strict = True
        ordered = True


class _PredictionKeys(_StrictOrdered):
    id: Series[str] = pa.Field(unique=True, str_matches=DOCUMENT_ID_PATTERN)
    split: Series[str] = pa.Field(isin=list(PREDICTION_SPLITS))
    label: Series[pa.Int64] = pa.Field(ge=0, le=NUM_CLASSES - 1)

    @pa.check(r"^logit_\d+$", regex=True, error="logits must be finite")
    def finite(cls, s: Series[float]) -> Series[bool]:
        return pd.Series(np.isfinite(s.to_numpy()), index=s.index)

    @pa.dataframe_check(error="test rows must be test documents, validation rows train documents")
    def split_matches_origin(cls, df: pd.DataFrame) -> Series[bool]:
        return df["id"].str.startswith("test/") == (df["split"] == "test")


Predictions = _with_class_columns(
    "Predictions",
    _PredictionKeys,
    LOGIT_COLUMNS,
    """``data/predictions/<model>/predictions.parquet``: one row per validation/test document.

    ``id``, ``split``, ``label`` and ``logit_0`` .. ``logit_19``: unnormalised scores whose
    softmax is the model's probability of class ``j`` (a linear model's decision function,
    a network's last layer). Calibrators are fitted on the validation rows; only the test
    rows are scored.
    """,
)


class _ProbabilityKeys(_StrictOrdered):
    id: Series[str] = pa.Field(unique=True)
    label: Series[pa.Int64] = pa.Field(ge=0, le=NUM_CLASSES - 1)

    @pa.check(r"^p_\d+$", regex=True, error="probabilities must lie in [0, 1]")
    def in_unit_interval(cls, s: Series[float]) -> Series[bool]:
        return s.between(-PROB_ATOL, 1 + PROB_ATOL)

    @pa.dataframe_check(error=f"probability rows must sum to 1 (within {PROB_ATOL})")
    def rows_sum_to_one(cls, df: pd.DataFrame) -> Series[bool]:
        return (df[list(PROB_COLUMNS)].sum(axis=1) - 1.0).abs() <= PROB_ATOL


Probabilities = _with_class_columns(
    "Probabilities",
    _ProbabilityKeys,
    PROB_COLUMNS,
    """Calibrated (or plain softmax) probabilities of one model on one split, per document:
    ``id``, ``label`` and ``p_0`` .. ``p_19``.""",
)


class MetricsRow(pa.DataFrameModel):
    """One row of the evaluate stage's summary: a model, before or after calibration."""

    model: Series[str] = pa.Field(str_matches=NAME_PATTERN)
    variant: Series[str] = pa.Field(isin=["uncalibrated", "calibrated"])
    n: Series[int] = pa.Field(ge=1)
    accuracy: Series[float] = pa.Field(ge=0, le=1)
    accuracy_ci_low: Series[float] = pa.Field(ge=0, le=1)
    accuracy_ci_high: Series[float] = pa.Field(ge=0, le=1)
    macro_f1: Series[float] = pa.Field(ge=0, le=1)
    nll: Series[float] = pa.Field(ge=0)
    brier: Series[float] = pa.Field(ge=0, le=2)
    ece: Series[float] = pa.Field(ge=0, le=1)
    ece_ci_low: Series[float] = pa.Field(ge=0, le=1)
    ece_ci_high: Series[float] = pa.Field(ge=0, le=1)
    ece_debiased: Series[float] = pa.Field(ge=0, le=1)
    adaptive_ece: Series[float] = pa.Field(ge=0, le=1)
    mce: Series[float] = pa.Field(ge=0, le=1)
    classwise_ece: Series[float] = pa.Field(ge=0, le=1)
    aurc: Series[float] = pa.Field(ge=0, le=1)

    class Config:
        strict = True

    @pa.dataframe_check(error="confidence intervals must be ordered low <= high")
    def ordered_intervals(cls, df: pd.DataFrame) -> Series[bool]:
        return (df["accuracy_ci_low"] <= df["accuracy_ci_high"]) & (
            df["ece_ci_low"] <= df["ece_ci_high"]
        )

    @pa.dataframe_check(error="one row per model and variant")
    def unique_rows(cls, df: pd.DataFrame) -> Series[bool]:
        return ~df.duplicated(["model", "variant"], keep=False)


class SetMetricsRow(pa.DataFrameModel):
    """One score of the evaluate stage's prediction sets: a model, conformal method,
    variant and level (:func:`pipeline.set_evaluation.score_sets`; the methods and variants
    of :mod:`pipeline.conformal`, named here so that this module does not import it)."""

    model: Series[str] = pa.Field(str_matches=NAME_PATTERN)
    method: Series[str] = pa.Field(isin=["lac", "aps"])
    variant: Series[str] = pa.Field(isin=["marginal", "mondrian"])
    level: Series[float] = pa.Field(gt=0, lt=1)
    coverage: Series[float] = pa.Field(ge=0, le=1)
    coverage_ci_low: Series[float] = pa.Field(ge=0, le=1)
    coverage_ci_high: Series[float] = pa.Field(ge=0, le=1)
    mean_set_size: Series[float] = pa.Field(ge=0, le=NUM_CLASSES)
    median_set_size: Series[float] = pa.Field(ge=0, le=NUM_CLASSES)
    singleton_share: Series[float] = pa.Field(ge=0, le=1)
    empty_share: Series[float] = pa.Field(ge=0, le=1)
    worst_class_coverage: Series[float] = pa.Field(ge=0, le=1)

    class Config:
        strict = True

    @pa.dataframe_check(error="coverage intervals must be ordered low <= high")
    def ordered_intervals(cls, df: pd.DataFrame) -> Series[bool]:
        return df["coverage_ci_low"] <= df["coverage_ci_high"]

    @pa.dataframe_check(error="one row per model, method, variant and level")
    def unique_rows(cls, df: pd.DataFrame) -> Series[bool]:
        return ~df.duplicated(["model", "method", "variant", "level"], keep=False)
