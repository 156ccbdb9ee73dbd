"""The served model with real MLflow: log, register, load in a fresh process, serve over HTTP.

A tiny tokenizer + classifier + calibrator are built once per module by the real stage
code (train_tokenizer, finetune's train_classifier, a temperature fit) on synthetic posts, then the
`register` stage logs and registers them in a throwaway SQLite store.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml
from mlflow import MlflowClient

from pipeline.calibration import fit_calibrator
from pipeline.domain import GROUPS, LOGIT_COLUMNS
from pipeline.encoder.trainer import FitOptions
from pipeline.encoder.training_stage import FinetunePaths
from pipeline.served_sets import SET_COLUMN, STATE_KEY
from pipeline.serving import (
    Scorer,
    ServedFiles,
    predictions_frame,
    prob_column,
    serving_config,
    validate_texts,
)
from pipeline.set_fitting import fit_sets
from pipeline.stages.finetune import train_classifier as finetune
from pipeline.tokenization import train_tokenizer
from tests.helpers import (
    ROOT,
    default_section,
    make_post,
    params_with,
    stage_env,
    wait_for_http,
)

NAME = "test-newsgroups"
TEXTS = (
    "Subject: graphics cards\n\nWhich card renders 3D fastest?",
    "Subject: hockey\n\nWhat a game.",
)
PROB_COLUMNS = [prob_column(g) for g in GROUPS]
SIZES = {"train": 8, "validation": 3, "test": 1}  # posts per group
MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "max_len": 32}
FINETUNE = {
    "init": "scratch",
    "batch_size": 16,
    "lr": 3e-3,
    "max_epochs": 15,
    "max_chunks": 3,
}
WIDE = {"C": 1.0, "bigram_buckets": 256}  # served logits include hashed bigrams
LEVELS = (0.9, 0.95)  # conformal levels of the blend's calibrator
SERVED_METHOD = "aps"  # register.set_method of the test project (not the default)


def post(group: int, k: int) -> str:
    return make_post(group, k)


def build_project(root: Path) -> None:
    """What register reads: the tokenizer, the encoder, the wide model, the blend and its
    calibrator (plus the documents table), made by the stages' own functions."""
    from datasets import Dataset, DatasetDict

    from pipeline.stages import blend, wide

    texts = {
        split: [(g, post(g, 100 * i + k)) for g in range(20) for k in range(n)]
        for i, (split, n) in enumerate(SIZES.items())
    }
    tokenizer = train_tokenizer(
        [t for _, t in texts["train"]],
        default_section("tokenizer", vocab_size=400, min_frequency=1),
    )
    (root / "data/tokenizer").mkdir(parents=True)
    tokenizer.save(str(root / "data/tokenizer/tokenizer.json"))
    splits, documents = {}, []
    for split, rows in texts.items():
        # ids as fetch makes them: <train|test>/<group>/<number>
        folder, offset = ("test", 0) if split == "test" else ("train", 1000 * (split != "train"))
        ids = [f"{folder}/{GROUPS[g]}/{offset + i}" for i, (g, _) in enumerate(rows)]
        tokens = [
            e.ids for e in tokenizer.encode_batch([t for _, t in rows], add_special_tokens=False)
        ]
        splits[split] = Dataset.from_dict(
            {
                "id": ids,
                "label": np.array([g for g, _ in rows], dtype=np.int64),
                "input_ids": [np.asarray(x, dtype=np.int32) for x in tokens],
            }
        )
        documents += [(i, split, g, GROUPS[g], t) for i, (g, t) in zip(ids, rows, strict=True)]
    DatasetDict(splits).save_to_disk(str(root / "data/tokenized"))
    (root / "data/raw").mkdir(parents=True)
    pd.DataFrame(documents, columns=["id", "split", "label", "label_name", "text"]).to_parquet(
        root / "data/raw/documents.parquet", index=False
    )
    finetune(
        default_section("model", **MODEL),
        default_section("finetune", **FINETUNE),
        default_section("trainer", progress_bar=False, log_every_n_steps=5),
        0,
        FinetunePaths(
            tokenized=root / "data/tokenized",
            tokenizer=root / "data/tokenizer/tokenizer.json",
            model=root / "data/models/classifier",
            predictions=root / "data/predictions/transformer",
            report=root / "reports/finetune.json",
            curves=root / "reports/finetune",
        ),
        FitOptions(trainer_overrides={"default_root_dir": str(root)}),
    )
    model, table, _ = wide.run(
        default_section("wide", **WIDE),
        0,
        tokenized=root / "data/tokenized",
        tokenizer=root / "data/tokenizer/tokenizer.json",
        documents=root / "data/raw/documents.parquet",
    )
    model.save(root / "data/models/wide")
    (root / "data/predictions/wide").mkdir(parents=True)
    table.to_parquet(root / "data/predictions/wide/predictions.parquet", index=False)
    cwd = Path.cwd()
    os.chdir(root)  # the blend stage reads the predictions contract from the project
    try:
        state, table, _ = blend.run(
            default_section("blend", models=["transformer", "wide"], folds=3), 0
        )
    finally:
        os.chdir(cwd)
    (root / "data/models/blend").mkdir(parents=True)
    (root / "data/models/blend/blend.json").write_text(json.dumps(state), encoding="utf-8")
    (root / "data/predictions/blend").mkdir(parents=True)
    table.to_parquet(root / "data/predictions/blend/predictions.parquet", index=False)
    val = table[table["split"] == "validation"]
    val_logits, val_labels = val[list(LOGIT_COLUMNS)].to_numpy(), val["label"].to_numpy()
    calibrator = fit_calibrator("temperature", val_logits, val_labels, 0)
    state = fit_sets(val_logits, val_labels, "temperature", {}, LEVELS, 3, 0)  # as calibrate
    (root / "data/models/calibrator").mkdir(parents=True)
    (root / "data/models/calibrator/blend.json").write_text(
        json.dumps({**calibrator.to_dict(), STATE_KEY: state.to_dict()}), encoding="utf-8"
    )
    # what evaluate reports for the blend (register describes the version with it)
    (root / "reports").mkdir(exist_ok=True)
    headline = {"accuracy": 0.9, "macro_f1": 0.9, "nll": 0.4, "brier": 0.2, "ece": 0.03}
    (root / "reports/metrics.json").write_text(
        json.dumps({"blend": {"uncalibrated": headline, "calibrated": headline}}),
        encoding="utf-8",
    )
    params = params_with(
        seed=0,
        tracking={"enabled": True, "uri": None, "experiment": "newsgroups-pipeline"},
        register={"model_name": NAME, "batch_size": 8, "set_method": SERVED_METHOD},
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_project(root)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def store(project: Path) -> str:
    return f"sqlite:///{project.parent / 'registry.db'}"


def env(store: str) -> dict[str, str]:
    return stage_env(MLFLOW_TRACKING_URI=store, PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def registered(project: Path, store: str) -> dict:
    """Run the register stage once: log + register version 1 in the SQLite store."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.register"],
        cwd=project,
        env=env(store),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((project / "reports/register.json").read_text())


def files(project: Path) -> ServedFiles:
    return ServedFiles(
        tokenizer=project / "data/tokenizer/tokenizer.json",
        classifier=project / "data/models/classifier",
        wide=project / "data/models/wide",
        blend=project / "data/models/blend/blend.json",
        calibrator=project / "data/models/calibrator/blend.json",
    )


def scorer(project: Path) -> Scorer:
    from pipeline.encoder.model import load_model_files

    config = serving_config(
        load_model_files(project / "data/models/classifier")[0], 8, "lac", "marginal"
    )
    return Scorer.load(files(project), config)


@pytest.fixture(scope="module")
def derived(project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[str]]:
    """What a clean interpreter imports to load the served model from the project's files
    and predict, and the requirements derived from it (what register logs)."""
    from pipeline.encoder.model import load_model_files
    from pipeline.served_requirements import distributions_of, pin, served_modules

    serving_file = tmp_path_factory.mktemp("served") / "serving.json"
    config = serving_config(load_model_files(project / "data/models/classifier")[0], 8)
    serving_file.write_text(json.dumps(config), encoding="utf-8")
    f = files(project)
    artifacts = {
        "tokenizer": str(f.tokenizer),
        "classifier": str(f.classifier),
        "wide": str(f.wide),
        "blend": str(f.blend),
        "calibrator": str(f.calibrator),
        "serving": str(serving_file),
    }
    modules = served_modules(artifacts)
    return modules, pin(distributions_of(modules))


def split_logits(project: Path, model: str, split: str) -> np.ndarray:
    preds = pd.read_parquet(project / f"data/predictions/{model}/predictions.parquet")
    return preds[preds["split"] == split].sort_values("id")[list(LOGIT_COLUMNS)].to_numpy()


def split_texts(project: Path, split: str) -> list[str]:
    docs = pd.read_parquet(project / "data/raw/documents.parquet")
    return docs[docs["split"] == split].sort_values("id")["text"].tolist()


# ------------------------------------------------------------------ pure pieces


def test_validate_texts_rejects_bad_input_in_one_line() -> None:
    ok = pd.DataFrame({"text": ["a post", "another"], "id": [1, 2]})
    assert validate_texts(ok) == ["a post", "another"]
    cases = {
        "missing column 'text' (found columns: body)": pd.DataFrame({"body": ["x"]}),
        "missing column 'text'$": pd.DataFrame(),
        "no rows": pd.DataFrame({"text": pd.Series([], dtype=object)}),
        "row 1: expected a string, got 5 (int)": pd.DataFrame({"text": ["x", 5]}),
        "row 0: expected a string, got missing": pd.DataFrame({"text": [None]}),
        "row 1: empty text": pd.DataFrame({"text": ["x", "  \n"]}),
    }
    for message, frame in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            validate_texts(frame)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="got list"):
        validate_texts(["a list"])


def test_column_formats_are_spread_into_rows() -> None:
    from pipeline.serving import as_frame

    one_row = pd.DataFrame({"text": [["first", None]]})  # how MLflow hands {"inputs": ...}
    assert as_frame(one_row)["text"].tolist() == ["first", None]
    plain = pd.DataFrame({"text": ["a", "b"]})
    assert as_frame(plain) is plain


def test_scorer_reproduces_the_pipeline_blend_logits(project: Path) -> None:
    """Raw text -> the logits each stage wrote: encoder, wide model and their blend."""
    s = scorer(project)
    texts = split_texts(project, "test")
    tokens = s.token_ids(texts)
    transformer = split_logits(project, "transformer", "test")
    np.testing.assert_allclose(s.encoder_logits(tokens), transformer, atol=1e-4)
    assert set(s.wide.vocabularies) == {"words", "chars"}  # served too, from the raw text
    np.testing.assert_allclose(s.wide.logits(tokens, texts), split_logits(project, "wide", "test"))
    blend = split_logits(project, "blend", "test")
    np.testing.assert_allclose(s.logits(texts), blend, atol=1e-4)
    assert set(s.weights) == {"transformer", "wide"} and all(w != 0 for w in s.weights.values())
    probs = s.probabilities(texts)
    frame = predictions_frame(probs, s.groups)
    assert list(frame.columns[:3]) == ["predicted_label", "predicted_id", "confidence"]
    assert list(frame.columns[3:]) == PROB_COLUMNS
    np.testing.assert_allclose(frame[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-9)
    assert (frame["predicted_label"] == [GROUPS[i] for i in frame["predicted_id"]]).all()
    assert (frame["predicted_id"] == blend.argmax(1)).all()


def sets_text(project: Path) -> pd.DataFrame:
    return pd.DataFrame({"text": pd.Series(split_texts(project, "test"), dtype=object)})


def test_served_signature_declares_the_set_level_param(project: Path) -> None:
    from pipeline.registry import served_signature

    signature = served_signature(scorer(project))
    assert signature.params.to_dict() == [
        {"name": "set_level", "type": "double", "default": None, "shape": None}
    ]
    outputs = signature.outputs.inputs
    names = [c.name for c in outputs]
    assert names == ["predicted_label", "predicted_id", "confidence", *PROB_COLUMNS, SET_COLUMN]
    assert outputs[-1].to_dict() == {
        "type": "array",
        "items": {"type": "string"},
        "name": SET_COLUMN,
        "required": False,
    }
    assert all(c.required for c in outputs[:-1])


def test_pyfunc_sets_are_off_by_default_nested_and_checked(project: Path) -> None:
    from dataclasses import replace

    from mlflow.exceptions import MlflowException

    from pipeline.served_sets import NO_SETS
    from pipeline.serving import NewsgroupsClassifier

    model = NewsgroupsClassifier()
    model.scorer = scorer(project)
    frame = sets_text(project)
    plain = model.predict(None, frame)
    assert list(plain.columns) == ["predicted_label", "predicted_id", "confidence", *PROB_COLUMNS]
    sets = {level: model.predict(None, frame, {"set_level": level}) for level in LEVELS}
    for answer in sets.values():
        pd.testing.assert_frame_equal(answer.drop(columns=[SET_COLUMN]), plain)
    small, large = sets[0.9][SET_COLUMN], sets[0.95][SET_COLUMN]
    assert all(set(a) <= set(b) for a, b in zip(small, large, strict=True))
    probs = plain[PROB_COLUMNS].to_numpy()
    for row, labels in zip(probs, large, strict=True):  # most probable first
        ranked = [row[GROUPS.index(g)] for g in labels]
        assert ranked == sorted(ranked, reverse=True) and set(labels) <= set(GROUPS)
    cases = {
        0.8: "set_level: level 0.8 was not fitted (fitted levels: 0.9, 0.95)",
        1.5: "set_level must lie in (0, 1), got 1.5",
        0.0: "set_level must lie in (0, 1), got 0.0",
        "0.9": "set_level must be a number in (0, 1), got '0.9'",
    }
    for level, message in cases.items():
        with pytest.raises(MlflowException) as info:
            model.predict(None, frame, {"set_level": level})
        assert info.value.message == message
    model.scorer = replace(model.scorer, sets=None)  # e.g. a calibrator without thresholds
    with pytest.raises(MlflowException, match=NO_SETS):
        model.predict(None, frame, {"set_level": 0.9})
    pd.testing.assert_frame_equal(model.predict(None, frame, {"set_level": None}), plain)


def test_a_calibrator_without_thresholds_still_serves(project: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline.encoder.model import load_model_files

    state = json.loads((project / "data/models/calibrator/blend.json").read_text())
    old = {k: v for k, v in state.items() if k != STATE_KEY}
    (tmp_path / "blend.json").write_text(json.dumps(old), encoding="utf-8")
    config = serving_config(load_model_files(project / "data/models/classifier")[0], 8)
    assert "set_method" not in config  # no sets asked for: serving.json as before
    loaded = Scorer.load(replace(files(project), calibrator=tmp_path / "blend.json"), config)
    assert loaded.sets is None
    texts = split_texts(project, "test")
    np.testing.assert_array_equal(loaded.probabilities(texts), scorer(project).probabilities(texts))
    full = scorer(project)
    assert full.sets is not None and full.sets.state.levels == LEVELS


@pytest.mark.slow
def test_served_requirements_are_what_loading_the_model_imports(derived: tuple) -> None:
    """Loading and predicting needs torch, tokenizers and scikit-learn, never the training
    and validation libraries; each requirement is pinned to requirements.lock."""
    from pipeline.served_requirements import locked_versions

    modules, requirements = derived
    loaded = {m.split(".")[0] for m in modules}
    assert {"torch", "tokenizers", "sklearn", "safetensors", "mlflow"} <= loaded
    assert not loaded & {"lightning", "pandera", "torchmetrics"}
    pins = dict(r.split("==") for r in requirements)
    assert len(pins) == len(requirements) and list(pins) == sorted(pins)
    needed = {"mlflow", "torch", "tokenizers", "safetensors", "numpy", "scipy", "scikit-learn"}
    assert needed <= set(pins)
    assert not set(pins) & {"lightning", "lightning-utilities", "pandera", "torchmetrics"}
    locked = locked_versions()
    assert {name: locked[name] for name in pins} == pins


def test_a_served_blend_must_be_of_models_serving_can_compute(tmp_path: Path) -> None:
    from pipeline.errors import PipelineError
    from pipeline.serving import read_blend

    path = tmp_path / "blend.json"
    path.write_text(json.dumps({"models": ["wide", "baseline"], "weights": [1.0, 2.0]}))
    with pytest.raises(
        PipelineError, match=r"can combine \['transformer', 'wide'\], not \['baseline'\]"
    ):
        read_blend(path)
    path.write_text(json.dumps({"models": ["wide"], "weights": [1.0, 2.0]}))
    with pytest.raises(PipelineError, match="not a blend state"):
        read_blend(path)


# ------------------------------------------------------------- registry + fresh load

LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"text": json.loads(sys.argv[2])}))
print(out.to_json(orient="split"))
"""


@pytest.mark.slow
def test_register_logs_a_run_and_a_registry_version(
    registered: dict, store: str, derived: tuple
) -> None:
    assert registered["registered"] is True
    assert registered["model_name"] == NAME and registered["version"] == 1
    assert registered["model_uri"] == f"models:/{NAME}/1"
    assert registered["alias_uri"] == f"models:/{NAME}@candidate"
    client = MlflowClient(tracking_uri=store)
    version = client.get_model_version(NAME, "1")
    assert version.run_id == registered["run_id"]
    # the version says what it is: description, tags, alias, metrics on the logged model
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "1"
    assert "accuracy 0.9000, ECE 0.0300, NLL 0.4000" in version.description
    assert version.tags["test_accuracy"] == "0.9000" and version.tags["test_ece"] == "0.0300"
    assert version.tags["config"] == "default" and version.tags["calibration"] == "temperature"
    assert (version.tags["set_method"], version.tags["set_variant"]) == (SERVED_METHOD, "marginal")
    assert version.tags["git_commit"] == "unknown"  # the test project is no git repo
    assert client.get_registered_model(NAME).description.startswith("20 Newsgroups classifier")
    logged = client.get_logged_model(registered["logged_model_uri"].removeprefix("models:/"))
    on_model = {m.key: m.value for m in logged.metrics}
    assert {k: on_model.get(k) for k in ("test_accuracy", "test_ece", "test_nll")} == {
        "test_accuracy": 0.9,
        "test_ece": 0.03,
        "test_nll": 0.4,
    }
    assert on_model["register/served_documents_per_second"] > 0  # measured on this model
    run = client.get_run(registered["run_id"])
    assert run.data.tags["stage"] == "register"
    assert run.data.params["register.model_name"] == NAME
    assert {"input.tokenizer", "input.classifier", "input.wide", "input.blend"} <= set(
        run.data.tags
    )
    served = registered["served"]
    assert served["size_mb"] > 0 and served["documents_per_second"] > 0
    assert served["throughput_documents"] == 20  # every test post of this project
    # logged as code: the model folder holds the reviewed file, not a pickled object
    model_id = registered["logged_model_uri"].removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    logged = Path(location.removeprefix("file://"))
    assert (logged / "served_model.py").is_file() and not list(logged.rglob("*.pkl"))
    requirements = (logged / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in requirements  # pinned from requirements.lock
    # exactly what loading the model imports (not a hand-written list)
    assert sorted(r for r in requirements if r and not r.startswith("#")) == sorted(derived[1])


@pytest.mark.slow
def test_registered_model_predicts_raw_text_in_a_fresh_process(
    registered: dict, store: str, project: Path, tmp_path: Path
) -> None:
    texts = [post(3, 7), "Subject: short\n\nA tiny post with few words."]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{NAME}/1", json.dumps(texts)],
        cwd=tmp_path,  # not the project: the model must bring its own code and files
        env={**env(store), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = pd.read_json(io.StringIO(proc.stdout.strip().splitlines()[-1]), orient="split")
    assert len(out) == 2
    assert [c for c in out.columns if c.startswith("prob_")] == PROB_COLUMNS
    np.testing.assert_allclose(out[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-6)
    assert set(out["predicted_label"]) <= set(GROUPS)
    expected = scorer(project).probabilities(texts)
    np.testing.assert_allclose(out[PROB_COLUMNS].to_numpy(), expected, atol=1e-6)


# ----------------------------------------------------------------------- HTTP serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(registered: dict, store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{NAME}/1",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env(store),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the uvicorn workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", proc, Path(log.name))
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def invoke(url: str, payload: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["text"], "data": [[TEXTS[0]], [TEXTS[1]]]}},
        {"dataframe_records": [{"text": TEXTS[0]}, {"text": TEXTS[1]}]},
        {"inputs": {"text": list(TEXTS)}},
        {"inputs": list(TEXTS)},
        {"instances": [{"text": TEXTS[0]}, {"text": TEXTS[1]}]},
    ],
    ids=["dataframe_split", "dataframe_records", "inputs-columns", "inputs-list", "instances"],
)
def test_served_model_answers_over_http(server: str, project: Path, payload: dict) -> None:
    response = invoke(server, payload)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    expected = scorer(project).probabilities(list(TEXTS))
    got = np.array([[row[c] for c in PROB_COLUMNS] for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [row["predicted_label"] for row in rows] == [GROUPS[i] for i in expected.argmax(1)]
    assert [row["confidence"] for row in rows] == pytest.approx(expected.max(1).tolist())


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"dataframe_split": {"columns": ["text"], "data": [["fine"], [" "]]}},
            "row 1: empty text",
        ),
        ({"dataframe_split": {"columns": ["body"], "data": [["x"]]}}, "missing column 'text'"),
        ({"dataframe_split": {"columns": ["text"], "data": [[5]]}}, "got 5 (int)"),
        ({"inputs": {"text": [None]}}, "row 0: expected a string, got missing (NoneType)"),
        ({"inputs": {"text": [5]}}, "row 0: expected a string, got 5 (int)"),
        ({"inputs": {"text": [1.5]}}, "row 0: expected a string, got 1.5 (float)"),
        ({"inputs": {"text": [True]}}, "row 0: expected a string, got True (bool)"),
        ({"inputs": {"text": []}}, "no rows"),
        ({"instances": [{"text": None}]}, "row 0: expected a string, got missing (NoneType)"),
        ({"dataframe_records": [{"text": "x"}, {"text": ""}]}, "row 1: empty text"),
        (
            {"inputs": {"text": ["fine"]}, "params": {"set_level": 0.8}},
            "set_level: level 0.8 was not fitted (fitted levels: 0.9, 0.95)",
        ),
        (
            {"inputs": {"text": ["fine"]}, "params": {"set_level": 1.5}},
            "set_level must lie in (0, 1), got 1.5",
        ),
    ],
    ids=[
        "empty",
        "wrong-column",
        "non-string",
        "inputs-null",
        "inputs-int",
        "inputs-float",
        "inputs-bool",
        "inputs-none",
        "instances-null",
        "records-empty",
        "set-level-not-fitted",
        "set-level-out-of-range",
    ],
)
def test_bad_requests_get_a_one_line_400(server: str, payload: dict, message: str) -> None:
    response = invoke(server, payload)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in body["message"] and "\n" not in body["message"], body["message"]
    assert "Failed to predict" not in body["message"]  # the request is not echoed back
    assert "stack_trace" not in body and "Traceback" not in response.text


def test_served_sets_over_http_nest_and_are_off_by_default(server: str, project: Path) -> None:
    from pipeline.served_sets import ServedSets

    texts = split_texts(project, "test")
    split = {"columns": ["text"], "data": [[t] for t in texts]}
    plain = invoke(server, {"dataframe_split": split})
    assert plain.status_code == 200, plain.text
    assert all(SET_COLUMN not in row for row in plain.json()["predictions"])
    sets = {}
    for level in LEVELS:
        response = invoke(server, {"dataframe_split": split, "params": {"set_level": level}})
        assert response.status_code == 200, response.text
        sets[level] = [row[SET_COLUMN] for row in response.json()["predictions"]]
    assert all(set(a) <= set(b) for a, b in zip(sets[0.9], sets[0.95], strict=True))
    served = scorer(project).sets
    assert served is not None
    expected = ServedSets(served.state, SERVED_METHOD, "marginal")  # register.set_method
    probs = scorer(project).probabilities(texts)
    assert sets[0.95] == expected.labels(probs, 0.95, GROUPS)


# -------------------------------------------------------------------------- batch CLI


def predict_cli(cwd: Path, store: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.tools.predict", *args],
        cwd=cwd,
        env=env(store),
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_predict_cli_scores_a_csv(registered: dict, store: str, project: Path) -> None:
    texts = [post(g, 900) for g in (0, 7, 19)]
    pd.DataFrame({"id": ["a", "b", "c"], "text": texts}).to_csv(project / "in.csv", index=False)
    # the default model is the champion of register.json's model: none before `make promote`
    proc = predict_cli(project, store, "--input", "in.csv", "--output", "out.csv")
    assert proc.returncode == 1 and not (project / "out.csv").exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"error: models:/{NAME}@champion: no champion") and "make promote" in last
    )
    promote = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.promote"],
        cwd=project,
        env=env(store),
        capture_output=True,
        text=True,
    )
    assert promote.returncode == 0, promote.stderr[-3000:]
    assert "champion (first version of" in promote.stdout
    proc = predict_cli(project, store, "--input", "in.csv", "--output", "out.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"models:/{NAME}@champion" in proc.stdout
    out = pd.read_csv(project / "out.csv")
    assert list(out.columns) == [
        "id",
        "predicted_label",
        "predicted_id",
        "confidence",
        *PROB_COLUMNS,
    ]
    assert list(out["id"]) == ["a", "b", "c"]
    np.testing.assert_allclose(out[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        out[PROB_COLUMNS].to_numpy(), scorer(project).probabilities(texts), atol=1e-6
    )


def test_predict_cli_adds_prediction_sets(registered: dict, store: str, tmp_path: Path) -> None:
    texts = [post(g, 901) for g in (0, 7, 19)]
    pd.DataFrame({"id": ["a", "b", "c"], "text": texts}).to_csv(tmp_path / "in.csv", index=False)
    model = ("--model", f"models:/{NAME}/1", "--input", "in.csv")
    proc = predict_cli(tmp_path, store, *model, "--output", "out.jsonl", "--set-level", "0.95")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pd.read_json(tmp_path / "out.jsonl", lines=True)
    columns = ["id", "predicted_label", "predicted_id", "confidence", *PROB_COLUMNS, SET_COLUMN]
    assert list(out.columns) == columns
    assert all(isinstance(s, list) and set(s) <= set(GROUPS) for s in out[SET_COLUMN])
    cases = {
        "0.8": "error: set_level: level 0.8 was not fitted (fitted levels: 0.9, 0.95)",
        "1.5": "error: set_level must lie in (0, 1), got 1.5",
    }
    for level, message in cases.items():
        proc = predict_cli(tmp_path, store, *model, "--output", "o.csv", "--set-level", level)
        assert proc.returncode == 1 and proc.stderr.strip() == message
        assert not (tmp_path / "o.csv").exists()


def test_predict_writes_sets_as_json_lists_in_csv(tmp_path: Path) -> None:
    from pipeline.tools.predict import write_predictions

    frame = pd.DataFrame({"predicted_id": [1, 2], SET_COLUMN: [["sci.med", "sci.space"], []]})
    write_predictions(frame, tmp_path / "out.csv")
    cells = pd.read_csv(tmp_path / "out.csv")[SET_COLUMN].map(json.loads).tolist()
    assert cells == [["sci.med", "sci.space"], []]
    assert frame[SET_COLUMN].tolist() == [["sci.med", "sci.space"], []]  # left as it was


@pytest.mark.slow
def test_predict_cli_bad_input_is_one_error_line(store: str, tmp_path: Path) -> None:
    pd.DataFrame({"body": ["x"]}).to_csv(tmp_path / "wrong.csv", index=False)
    pd.DataFrame({"text": ["fine", ""]}).to_csv(tmp_path / "empty.csv", index=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    cases = {
        "wrong.csv": "wrong.csv: missing column 'text' (found columns: body)",
        "empty.csv": "empty.csv: column 'text', row 1: empty text",
        "bad.jsonl": "bad.jsonl: column 'text', row 1: expected a string, got 3 (int)",
        "absent.csv": "absent.csv: file not found",
    }
    for name, message in cases.items():
        args = ("--model", f"models:/{NAME}/1", "--input", name, "--output", "out.csv")
        proc = predict_cli(tmp_path, store, *args)
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"error: {message}"
        assert not (tmp_path / "out.csv").exists()
    proc = predict_cli(
        tmp_path,
        store,
        "--model",
        "models:/no-such-model/1",
        "--input",
        "wrong.csv",
        "--output",
        "o.csv",
        "--column",
        "body",
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot load model models:/no-such-model/1")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_register_without_tracking_writes_only_its_report(project: Path, tmp_path: Path) -> None:
    for name in ("data", "params.yaml"):
        (tmp_path / name).symlink_to(project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").unlink()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.register"],
        cwd=tmp_path,
        env=env(f"sqlite:///{tmp_path / 'never.db'}"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "reports/register.json").read_text())
    assert report == {
        "model_name": NAME,
        "registered": False,
        "reason": "tracking.enabled is false",
    }
    assert not (tmp_path / "never.db").exists()


def test_read_texts_formats(tmp_path: Path) -> None:
    from pipeline.errors import PipelineError
    from pipeline.tools.predict import read_texts

    (tmp_path / "a.txt").write_text("first post\nsecond post\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt")["text"].tolist() == ["first post", "second post"]
    (tmp_path / "b.jsonl").write_text('{"id": 1, "body": "x"}\n', encoding="utf-8")
    assert read_texts(tmp_path / "b.jsonl", "body").columns.tolist() == ["id", "text"]
    with pytest.raises(PipelineError, match=r"c\.parquet: unsupported input type"):
        read_texts(tmp_path / "c.parquet")


def test_register_checks_its_inputs_first(project: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline.errors import PipelineError
    from pipeline.registry import check_inputs, served_metrics

    with pytest.raises(PipelineError, match="tokenizer.json: not found"):
        check_inputs(replace(files(project), tokenizer=tmp_path / "tokenizer.json"))
    with pytest.raises(PipelineError, match=r"blend.json: not found \(run the blend stage\)"):
        check_inputs(replace(files(project), blend=tmp_path / "blend.json"))
    with pytest.raises(PipelineError, match=r"metrics.json: not found \(run `dvc repro evaluate"):
        served_metrics(tmp_path / "metrics.json")
    (tmp_path / "metrics.json").write_text('{"wide": {}}')
    with pytest.raises(PipelineError, match="metrics.json: no calibrated blend accuracy/ece/nll"):
        served_metrics(tmp_path / "metrics.json")


def test_registered_names_keep_toy_runs_off_the_production_name() -> None:
    from pipeline.registry import registered_name

    production = default_section("register")
    name = registered_name(production.model_name, production.production, "default")
    assert name == "newsgroups-classifier"
    smoke = default_section("register", production=False)
    assert (
        registered_name(smoke.model_name, smoke.production, "smoke")
        == "newsgroups-classifier-smoke"
    )
