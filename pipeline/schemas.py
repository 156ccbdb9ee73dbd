"""pandera schemas for the tables that cross stage boundaries.

Each stage validates what it reads and what it writes. Validation is lazy: every failure
is collected and reported at once, as a short table a person can read.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from pipeline.errors import PipelineError

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
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Documents in the complete bydate archive; validation is carved out of train.
FULL_SPLIT_SIZES: dict[str, int] = {"train+validation": 11314, "test": 7532}


class Documents(pa.DataFrameModel):
    """The documents table written by `fetch`: one row per post."""

    id: Series[str] = pa.Field(unique=True, str_matches=r"^(train|test)/[^/]+/[^/]+$")
    split: Series[str] = pa.Field(isin=list(SPLITS))
    label: Series[int] = pa.Field(ge=0, le=len(GROUPS) - 1)
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
    label: Series[int] = pa.Field(ge=0, le=len(GROUPS) - 1)
    length: Series[pa.Int32] = pa.Field(ge=0)

    class Config:
        strict = "filter"
