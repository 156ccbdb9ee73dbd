"""Benchmark: every calibration method fitted on validation, scored on test, per model.

Run from the repo root (or give ``--project``) after `fetch` and a model stage on the full
data, e.g. ``python -m pipeline.stages.fetch && python -m pipeline.stages.baseline``. For
each model in
``data/predictions/<model>/predictions.parquet`` it fits every method of
:mod:`pipeline.calibration` (and ``auto`` over two candidate lists) on the validation
rows only and reports, on the test rows: ECE (15 equal-width bins), debiased ECE, NLL
and accuracy; plus the model's validation accuracy, to see how well validation predicts
test. ``--svm`` adds a second proxy model, TF-IDF on words + LinearSVC fitted on the train
split (its decision function as logits), since a LinearSVC-heavy blend is the default.

Prints a table and merges its figures into ``reports/bench/calibration.json`` under the
validation scheme of the project (``reports/data.json``), so running it once per scheme
(``data.validation=thread|latest|random``) fills one table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.calibration import METHODS, fit_calibrator, select_auto, softmax
from pipeline.calibration.options import CalibrateOptions
from pipeline.config import CONF_DIR
from pipeline.domain import LOGIT_COLUMNS
from pipeline.io import write_json
from pipeline.metrics import accuracy, ece, ece_debiased, nll
from pipeline.predictions import check_against_documents
from pipeline.schemas import Predictions, validate

OUT = Path("reports/bench/calibration.json")
LOW_PARAMETER = ("temperature", "ets", "temperature_platt")


def method_options() -> dict[str, dict[str, Any]]:
    """The per-method options of the default config (conf/calibrate/default.yaml)."""
    conf = yaml.safe_load((CONF_DIR / "calibrate/default.yaml").read_text(encoding="utf-8"))
    return CalibrateOptions.model_validate(conf["options"]).model_dump()


def score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "ece": ece(probs, labels),
        "ece_debiased": ece_debiased(probs, labels),
        "nll": nll(probs, labels),
        "accuracy": accuracy(probs, labels),
    }


def bench_model(
    val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seed: int, folds: int
) -> dict[str, Any]:
    """Every method (and auto) fitted on validation logits, scored on test logits."""
    (zv, yv), (zt, yt) = val, test
    opts = method_options()
    result: dict[str, Any] = {
        "validation_documents": len(yv),
        "test_documents": len(yt),
        "validation_accuracy": accuracy(softmax(zv), yv),
        "methods": {},
    }
    for method in ("none", *METHODS):
        start = time.perf_counter()
        cal = fit_calibrator(method, zv, yv, seed, **opts.get(method, {}))
        row = score(cal.predict_proba(zt), yt)
        row["fit_seconds"] = round(time.perf_counter() - start, 2)
        result["methods"][method] = row
    for name, candidates in (("auto_low", LOW_PARAMETER), ("auto_all", METHODS)):
        chosen, table = select_auto(zv, yv, candidates, folds, seed, opts)
        result["methods"][name] = {
            "chosen": chosen,
            "cv_nll": {m: round(v["mean_nll"], 4) for m, v in table.items()},
            **result["methods"][chosen],
        }
    return result


def load_model(project: Path, model: str, docs: pd.DataFrame) -> pd.DataFrame:
    path = project / "data/predictions" / model / "predictions.parquet"
    table = validate(pd.read_parquet(path), Predictions, str(path))
    check_against_documents(table, docs, str(path))
    return table


def arrays(table: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    part = table[table["split"] == split]
    logits = part[list(LOGIT_COLUMNS)].to_numpy(np.float64, copy=True)
    return logits, part["label"].to_numpy(np.int64, copy=True)


def svm_predictions(docs: pd.DataFrame, c: float) -> pd.DataFrame:
    """TF-IDF (words, sublinear, min_df=2) + LinearSVC fitted on train; decision values."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    train = docs[docs["split"] == "train"]
    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2, dtype=np.float64)
    model = LinearSVC(C=c).fit(vectorizer.fit_transform(train["text"]), train["label"])
    rest = docs[docs["split"] != "train"].reset_index(drop=True)
    logits = model.decision_function(vectorizer.transform(rest["text"]))
    table = pd.DataFrame(logits, columns=list(LOGIT_COLUMNS))
    return pd.concat([rest[["id", "split", "label"]].astype({"label": "int64"}), table], axis=1)


def print_table(scheme: str, model: str, result: dict[str, Any]) -> None:
    print(
        f"\n{model} ({scheme} validation, {result['validation_documents']} rows; validation "
        f"accuracy {100 * result['validation_accuracy']:.2f}%)"
    )
    print(f"{'method':20s} {'ECE %':>7s} {'deb. %':>7s} {'NLL':>7s} {'acc %':>7s}  chosen")
    for method, row in result["methods"].items():
        print(
            f"{method:20s} {100 * row['ece']:7.2f} {100 * row['ece_debiased']:7.2f} "
            f"{row['nll']:7.4f} {100 * row['accuracy']:7.2f}  {row.get('chosen', '')}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--models", nargs="*", help="default: every data/predictions/<model>")
    parser.add_argument("--svm", action="store_true", help="add TF-IDF + LinearSVC on words")
    parser.add_argument("--svm-c", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    project = args.project
    docs = pd.read_parquet(project / "data/raw/documents.parquet")
    data_report = json.loads((project / "reports/data.json").read_text(encoding="utf-8"))
    scheme = data_report.get("validation_scheme", "random")
    models = args.models or sorted(
        p.parent.name for p in (project / "data/predictions").glob("*/predictions.parquet")
    )
    tables = {m: load_model(project, m, docs) for m in models}
    if args.svm:
        tables["svm_words"] = svm_predictions(docs, args.svm_c)
    results = {}
    for model, table in tables.items():
        results[model] = bench_model(
            arrays(table, "validation"), arrays(table, "test"), args.seed, args.folds
        )
        print_table(scheme, model, results[model])

    figures = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    command = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    figures.setdefault("schemes", {})[scheme] = {
        "command": "python " + " ".join(command),
        "thread_overlap_with_train": data_report.get("thread_overlap_with_train"),
        "models": results,
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    figures.update(
        seed=args.seed,
        folds=args.folds,
        options=method_options(),
        machine=f"{machine}, Python {platform.python_version()}",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, figures)
    print(f"\nwrote {args.out} ({scheme})")


if __name__ == "__main__":
    main()
