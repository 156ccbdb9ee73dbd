"""Score a file of texts in batch with the served (pyfunc) model.

    python -m pipeline.tools.predict --input texts.csv --output preds.csv
    python -m pipeline.tools.predict --model models:/newsgroups-classifier/3 --input posts.jsonl \
        --output preds.jsonl

``--model`` is any MLflow model URI (``models:/NAME/VERSION``, ``runs:/...``) or a local
model folder; without it, ``models:/NAME@champion`` for the ``model_name`` of
``reports/register.json`` (``make promote`` sets the alias). ``models:/``
URIs are looked up in ``MLFLOW_TRACKING_URI``, else ``--tracking-uri``, else the project's
store (the same resolution as the stages). Input: ``.csv`` / ``.jsonl`` with a ``text``
column (``--column``), or ``.txt`` with one text per line. Output (``.csv`` or ``.jsonl``):
the input's other columns, then ``predicted_label``, ``predicted_id``, ``confidence`` and
``prob_<group>``; with ``--set-level 0.95`` also ``prediction_set``, the conformal set of
groups at that level (most probable first; a JSON list in a ``.csv`` cell). The input and
the level are checked before the model is loaded, so a bad file fails in a second with
one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline import paths
from pipeline.conformal import check_level
from pipeline.errors import PipelineError, first_line, run_stage
from pipeline.io import atomic_outputs
from pipeline.served_sets import LEVEL_PARAM, NO_SETS, SET_COLUMN
from pipeline.serving import TEXT_COLUMN, validate_texts
from pipeline.tracking import resolve_uri

CHAMPION = "champion"  # the alias `make promote` moves (pipeline.tools.promote)

INPUT_SUFFIXES = (".csv", ".jsonl", ".txt")
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def read_texts(path: Path, column: str = TEXT_COLUMN) -> pd.DataFrame:
    """The input table, checked with :func:`pipeline.serving.validate_texts`."""
    if path.suffix not in INPUT_SUFFIXES:
        raise PipelineError(f"{path}: unsupported input type (use {', '.join(INPUT_SUFFIXES)})")
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        if path.suffix == ".txt":
            frame = pd.DataFrame({column: path.read_text(encoding="utf-8").splitlines()})
        elif path.suffix == ".csv":
            frame = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[])
        else:
            frame = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise PipelineError(f"{path}: cannot read ({first_line(exc)})") from None
    try:
        validate_texts(frame, column)
    except ValueError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    if column != TEXT_COLUMN:
        frame = frame.rename(columns={column: TEXT_COLUMN})
    return frame.reset_index(drop=True)


def default_model() -> str:
    """The champion version of the model the last ``register`` run registered."""
    try:
        report = json.loads(paths.stage_report("register").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        raise PipelineError(
            f"no --model given and no usable {paths.stage_report('register')} (run the "
            "register stage)"
        ) from None
    if not report.get("model_uri"):
        raise PipelineError(
            f"{paths.stage_report('register')}: no model was registered (tracking disabled?)"
        )
    return f"models:/{report['model_name']}@{CHAMPION}"


def load_model(uri: str, tracking_uri: str | None) -> mlflow.pyfunc.PyFuncModel:
    """Load a pyfunc model; a missing or unreadable model is one clear line."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    if Path(uri).exists():
        uri = str(Path(uri).resolve())
    else:
        mlflow.set_tracking_uri(resolve_uri(tracking_uri, os.environ, Path.cwd()))
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        if uri.endswith(f"@{CHAMPION}") and "alias" in first_line(exc).lower():
            raise PipelineError(
                f"{uri}: no champion version yet: run `make promote` (or pass --model)"
            ) from None
        raise PipelineError(f"cannot load model {uri}: {first_line(exc)}") from None


def score(
    model: mlflow.pyfunc.PyFuncModel, frame: pd.DataFrame, set_level: float | None = None
) -> pd.DataFrame:
    """Predictions next to the input's other columns (the text itself is left out), with
    the prediction sets at ``set_level`` when it is given."""
    params = None if set_level is None else {LEVEL_PARAM: set_level}
    try:
        preds = model.predict(frame[[TEXT_COLUMN]], params=params)
    except MlflowException as exc:
        raise PipelineError(exc.message.strip().splitlines()[-1]) from None
    if set_level is not None and SET_COLUMN not in preds:  # a model logged without sets
        raise PipelineError(NO_SETS)
    rest = frame.drop(columns=[TEXT_COLUMN])
    return pd.concat([rest, preds.reset_index(drop=True)], axis=1)


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    with atomic_outputs() as out:
        tmp = out.file(path)
        if path.suffix == ".csv":
            if SET_COLUMN in frame:  # one JSON list per cell, not Python's repr
                frame = frame.assign(**{SET_COLUMN: frame[SET_COLUMN].map(json.dumps)})
            frame.to_csv(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="MLflow model URI or folder (default: register.json)")
    parser.add_argument("--input", type=Path, required=True, help=".csv, .jsonl or .txt")
    parser.add_argument("--output", type=Path, required=True, help=".csv or .jsonl")
    parser.add_argument("--column", default=TEXT_COLUMN, help="text column of .csv/.jsonl")
    parser.add_argument("--tracking-uri", help="store of models:/ URIs (default: the project's)")
    parser.add_argument(
        "--set-level", type=float, help="add each text's prediction set at this fitted level"
    )
    args = parser.parse_args(argv)
    if args.output.suffix not in OUTPUT_SUFFIXES:
        raise PipelineError(f"{args.output}: unsupported output type (use .csv or .jsonl)")
    if args.set_level is not None:
        try:
            check_level(args.set_level, LEVEL_PARAM)
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
    frame = read_texts(args.input, args.column)
    model_uri = args.model or default_model()
    predictions = score(load_model(model_uri, args.tracking_uri), frame, args.set_level)
    write_predictions(predictions, args.output)
    counts = predictions["predicted_label"].value_counts().head(3).to_dict()
    print(f"predict: {len(predictions)} texts scored with {model_uri} -> {args.output} {counts}")


if __name__ == "__main__":
    run_stage(main)
