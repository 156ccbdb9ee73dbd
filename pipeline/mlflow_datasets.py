"""The splits of the documents table as MLflow datasets.

``fetch`` records one entry per split in ``reports/data.json`` (``datasets``, see
:func:`pipeline.sources.documents.split_datasets`): its MLflow name, digest, source and
row count. Every tracked stage links the three datasets to its run (``mlflow.log_input``)
with its split as context (``train``, ``validation``, ``test``); MLflow keeps one input
per (name, digest) on a run, so each split has its own name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CONTEXT_TAG = "mlflow.data.context"
# The documents table's columns as MLflow column types (see pipeline.schemas.Documents).
COLUMNS = {
    "id": "string",
    "split": "string",
    "label": "long",
    "label_name": "string",
    "text": "string",
}


def _source(source: str) -> tuple[str, str]:
    """MLflow's source type and source JSON of an archive URL or file."""
    if source.startswith(("http://", "https://")):
        return "http", json.dumps({"url": source})
    return "local", json.dumps({"uri": source})


def dataset_inputs(entries: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    """MLflow ``DatasetInput`` objects of the ``datasets`` entries of ``reports/data.json``,
    each with its split as context."""
    # Deferred: mlflow is slow to import, and a stage with tracking off never needs it.
    from mlflow.entities import Dataset, DatasetInput, InputTag

    schema = json.dumps(
        {"mlflow_colspec": [{"type": t, "name": n, "required": True} for n, t in COLUMNS.items()]}
    )
    inputs = []
    for split, entry in entries.items():
        source_type, source = _source(str(entry["source"]))
        profile = json.dumps(
            {"num_rows": entry["rows"], "num_elements": entry["rows"] * len(COLUMNS)}
        )
        dataset = Dataset(entry["name"], entry["digest"], source_type, source, schema, profile)
        inputs.append(DatasetInput(dataset, [InputTag(CONTEXT_TAG, split)]))
    return inputs


def logged_digests(run: Any) -> dict[str, str]:
    """Dataset name -> digest of the inputs of an MLflow run."""
    return {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
