"""Stage `fetch`: the 20 Newsgroups "bydate" archive -> one validated documents table.

Source, in order of precedence: the ``NEWSGROUPS_ARCHIVE`` environment variable, the
``data.archive`` param, or a download of ``data.url`` (checksum-verified, resumable). A
local archive must match ``NEWSGROUPS_ARCHIVE_SHA256`` / ``data.archive_sha256`` when
given, or one of the known archives otherwise. The archive is read without extracting it
(:mod:`pipeline.sources.bydate`); every group must have posts in train and test. The
validation split is carved out of train by ``data.validation`` (:mod:`pipeline.splits`).

Outputs: ``data/raw/documents.parquet`` (id, split, label, label_name, text) and
``reports/data.json`` (documents per split and class, content digests, the validation
scheme, the share of validation and test posts whose thread has train posts, and the
MLflow dataset of each split with the exact digest it is logged with).
"""

from __future__ import annotations

import os

from pydantic import Field

from pipeline import paths
from pipeline.config import Section, load_section, load_seed
from pipeline.domain import FULL_SPLIT_SIZES
from pipeline.errors import run_stage
from pipeline.io import atomic_outputs, write_json
from pipeline.schemas import Documents, validate
from pipeline.sources.bydate import (
    KNOWN_ARCHIVES,
    StripPart,
    parse_archive,
    resolve_source,
    verify_archive,
)
from pipeline.sources.documents import build_table, make_report, split_datasets
from pipeline.splits import ValidationScheme, check_groups
from pipeline.tracking import StageRun, split_report

SHA256 = r"^[0-9a-f]{64}$"


class DataParams(Section):
    """Section ``data`` of params.yaml."""

    url: str = Field(
        pattern=r"^https?://",
        description="Where the bydate archive is downloaded from (the one scikit-learn uses).",
    )
    url_sha256: str = Field(pattern=SHA256, description="sha256 the download from url must have.")
    archive: str | None = Field(
        description="Local archive to use instead of downloading (null: download url; the "
        "NEWSGROUPS_ARCHIVE environment variable takes precedence)."
    )
    archive_sha256: str | None = Field(
        pattern=SHA256,
        description="sha256 of the local archive (null: it must be one of the known archives).",
    )
    remove: list[StripPart] = Field(
        description="Parts of each post to strip, as scikit-learn's remove= (headers, footers, "
        "quotes); empty keeps everything, the setting published results use."
    )
    validation_fraction: float = Field(
        gt=0.0,
        lt=1.0,
        description="Share of each class of the train split held out as the validation split "
        "(early stopping, calibration); test is never used for fitting.",
    )
    validation: ValidationScheme = Field(
        description="How validation is carved out of train: thread (whole threads, like most "
        "test posts), latest (each group's newest posts) or random (overstates test accuracy)."
    )
    new_author_share: float = Field(
        ge=0.0,
        le=1.0,
        description="validation=thread: share of each group's validation posts moved with all "
        "posts of their authors, so validation has as many new authors as test (0: threads "
        "alone).",
    )
    max_docs_per_class: int | None = Field(
        ge=1,
        description="Keep at most this many documents per class and split (null: all); "
        "for smoke runs.",
    )


def main() -> None:
    params = load_section("data", DataParams)
    seed = load_seed()
    tracking = StageRun("fetch")
    source = resolve_source(params, dict(os.environ))
    if source.download_url is not None:
        # Deferred: requests is slow to import, and only a download needs it.
        from pipeline.download import download

        download(source.download_url, source.path, params.url_sha256)
    archive_sha256 = verify_archive(source)
    raw = parse_archive(source.path)
    full = KNOWN_ARCHIVES.get(archive_sha256) is not None
    validate(raw, Documents, f"{source.path}", FULL_SPLIT_SIZES if full else None)
    check_groups(raw, ("train", "test"), f"{source.path}")
    df, keys, dropped = build_table(raw, params, seed)
    validate(df, Documents, str(paths.RAW / paths.DOCUMENTS.name))
    report = make_report(df, keys, raw, archive_sha256, params, dropped)
    report["datasets"] = split_datasets(df, source.download_url or str(source.path))
    with atomic_outputs() as out:
        df.to_parquet(out.dir(paths.RAW) / paths.DOCUMENTS.name, index=False)
        write_json(out.file(paths.stage_report("data")), report)
    print(
        f"fetch: {report['documents']} -> {paths.RAW / paths.DOCUMENTS.name}, "
        f"{paths.stage_report('data')}"
    )
    _, stats = split_report("fetch", report, {}, skip=("per_class", "datasets"))
    tracking.finish(
        ["seed", "data"],
        report=stats,
        artifacts=[paths.stage_report("data")],
        inputs={"archive": archive_sha256},
    )


if __name__ == "__main__":
    run_stage(main)
