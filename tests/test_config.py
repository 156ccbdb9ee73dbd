"""params.yaml stays the composition of conf/, and bad params fail with one clear line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.config import compose, load_section, load_seed, validate_params
from pipeline.errors import PipelineError
from pipeline.stages.fetch import DataParams
from pipeline.stages.tokenize import TokenizerParams
from tests.helpers import ROOT

# How a conf/ group file's one-line header ends: where its keys are described.
POINTER = " (keys: docs/params.md)."


def test_params_yaml_matches_conf() -> None:
    committed = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert committed == compose(), "params.yaml drifted from conf/: run `make params`"


def test_smoke_experiment_overrides_group_values() -> None:
    default, smoke = yaml.safe_load(compose()), yaml.safe_load(compose(["experiment=smoke"]))
    assert default["data"]["max_docs_per_class"] is None
    assert smoke["data"]["max_docs_per_class"] == 8
    assert smoke["tokenizer"]["vocab_size"] < default["tokenizer"]["vocab_size"]
    assert "experiment" not in smoke


def test_every_section_of_the_default_config_validates() -> None:
    load_section("data", DataParams, ROOT / "params.yaml")
    load_section("tokenizer", TokenizerParams, ROOT / "params.yaml")
    assert load_seed(ROOT / "params.yaml") == 42
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert set(params) == {"seed", *config.SECTIONS}  # the registry names every section
    validate_params(params, "params.yaml")


def _group_options() -> list[str]:
    """Every option of every conf/ group, as an override (experiments included)."""
    return sorted(
        f"{path.parent.name}={path.stem}"
        for path in (ROOT / "conf").glob("*/*.yaml")
        if len(list(path.parent.glob("*.yaml"))) > 1 or path.parent.name == "experiment"
    )


@pytest.mark.parametrize("override", _group_options())
def test_every_group_option_validates(override: str) -> None:
    validate_params(yaml.safe_load(compose([override])), override)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # every section is validated before anything is written, not only fetch's
        ("finetune.lr=-1", "finetune.lr=-1: Input should be greater than 0"),
        (
            "experiment=nope",
            "In 'config': Could not find 'experiment/nope' (available: gpu, smoke)",
        ),
    ],
)
def test_make_params_fails_with_one_line_and_writes_nothing(
    tmp_path: Path, override: str, message: str
) -> None:
    import subprocess
    import sys

    out = tmp_path / "params.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.config", override, "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: conf/: overrides ['{override}']: {message}"
    ]
    assert not out.exists()


def test_make_params_names_every_bad_key(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    with pytest.raises(PipelineError, match=r"wide.C=0: Input should.*; gate.variant='x'"):
        config.main(["wide.C=0", "gate.variant=x", "-o", str(out)])
    assert not out.exists()


def test_every_field_of_every_section_has_a_description() -> None:
    missing = [
        f"{cls.__name__}.{name}"
        for cls in _sections()
        for name, field in cls.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert len(_sections()) >= 10 and not missing, missing


def test_no_section_field_has_a_python_default() -> None:
    """conf/ holds every value: a Python default would be a second, unchecked one."""
    defaulted = [
        f"{cls.__name__}.{name}"
        for cls in _sections()
        for name, field in cls.model_fields.items()
        if not field.is_required()
    ]
    assert not defaulted, f"{defaulted}: put the value in conf/ and make the field required"


def test_docs_params_table_is_generated() -> None:
    doc = (ROOT / "docs" / "params.md").read_text(encoding="utf-8")
    expected = config.doc_with_table(doc, config.params_table())
    assert doc == expected, (
        "docs/params.md's params table differs from the section descriptions and conf/: run "
        "`make params-doc` (python -m pipeline.config --write-docs)"
    )


def test_write_docs_needs_one_table_block() -> None:
    with pytest.raises(PipelineError, match="expected one"):
        config.doc_with_table("# Params\n\nno markers\n", "| table |\n")


def test_describe_prints_every_param_once(capsys: pytest.CaptureFixture[str]) -> None:
    config.main(["--describe"])
    rows = capsys.readouterr().out.splitlines()[2:]
    keys = [row.split("`")[1] for row in rows]
    params = yaml.safe_load(compose())
    assert len(keys) == len(set(keys)) and "calibrate.options.matrix.reg" in keys
    assert {k.split(".")[0] for k in keys} == set(params)
    assert "| `finetune.lr` | `0.002` | Peak AdamW learning rate" in "\n".join(rows)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "conf").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_conf_comments_are_group_headers_only(path: Path) -> None:
    """Keys are described once, by their Field(description=...), shown in docs/params.md:
    a conf/ file has a one-line header saying what the file is (an experiment file after
    Hydra's ``# @package`` line), a group file ending it with the pointer to that table
    and with no comment on single keys."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    header, body = lines[:start], lines[start:]
    if path.parent.name == "experiment":  # overrides: comments on keys may say why
        assert header[0] == "# @package _global_" and len(header) == 2, f"{path}: {header}"
        return
    assert len(header) == 1, f"{path}: the header must be one line, not {len(header)}"
    assert header[0].endswith(POINTER), f"{path}: the header must end with '{POINTER}'"
    commented = [line for line in body if "#" in line]
    assert not commented, (
        f"{path}: per-key comments {commented}: describe the key in its section class's "
        "Field(description=...) instead (docs/params.md shows it)"
    )


@pytest.mark.parametrize(
    "path", sorted((ROOT / "conf").rglob("*.yaml")), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_conf_has_no_measured_figures_or_dates(path: Path) -> None:
    """Numbers measured on a run live in reports/ and docs/results.md, not in conf/."""
    pattern = re.compile(r"[0-9]+(\.[0-9]+)? ?%|20[0-9]{2}-[0-9]{2}-[0-9]{2}")
    found = [line for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
    assert not found, f"{path}: {found}"


def _params_with(tmp_path: Path, section: str, **values: object) -> Path:
    params = yaml.safe_load(compose())
    params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"vocab_sise": 10}, r"unknown key tokenizer.vocab_sise \(allowed keys: kind, vocab_size"),
        ({"vocab_size": "big"}, r"tokenizer.vocab_size='big': Input should be a valid integer"),
        (
            {"vocab_size": 5},
            r"tokenizer.vocab_size=5: Input should be greater than or equal to 300",
        ),
        (
            {"kind": "sentencepiece"},
            r"tokenizer.kind='sentencepiece': Input should be 'bpe' or 'wordpiece'",
        ),
        ({"lowercase": "yes"}, r"tokenizer.lowercase='yes': Input should be a valid boolean"),
    ],
)
def test_invalid_tokenizer_params(tmp_path: Path, values: dict, message: str) -> None:
    path = _params_with(tmp_path, "tokenizer", **values)
    with pytest.raises(PipelineError, match=message) as err:
        load_section("tokenizer", TokenizerParams, path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"validation_fraction": 1.5},
            r"data.validation_fraction=1.5: Input should be less than 1",
        ),
        ({"remove": ["signatures"]}, r"data.remove.0='signatures': Input should be 'headers'"),
        ({"max_docs_per_class": 0}, r"data.max_docs_per_class=0: Input should be greater"),
        ({"archive_sha256": "abc"}, r"data.archive_sha256='abc': String should match pattern"),
    ],
)
def test_invalid_data_params(tmp_path: Path, values: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        load_section("data", DataParams, _params_with(tmp_path, "data", **values))


def test_missing_or_malformed_params_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="params.yaml: file not found"):
        load_section("data", DataParams, tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed", encoding="utf-8")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_section("data", DataParams, tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: -1\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="missing section 'data'"):
        load_section("data", DataParams, tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="seed=-1: expected a non-negative integer"):
        load_seed(tmp_path / "params.yaml")


def _sections() -> list[type]:
    """Every params section class of the pipeline (imported from every module)."""
    import importlib
    import pkgutil

    import pipeline
    from pipeline.config import Section

    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        importlib.import_module(info.name)
    found, todo = [], [Section]
    while todo:
        cls = todo.pop()
        found += cls.__subclasses__()
        todo += cls.__subclasses__()
    return sorted(set(found), key=lambda c: c.__name__)


def test_every_numeric_param_has_a_range() -> None:
    from typing import get_args

    import annotated_types as at

    def numeric(annotation: object) -> bool:
        args = get_args(annotation) or (annotation,)
        return any(a in (int, float) for a in args if a is not bool)

    def bounded(field) -> bool:
        bounds = (at.Ge, at.Gt, at.Le, at.Lt, at.Interval)
        if any(isinstance(m, bounds) for m in field.metadata):
            return True
        # an Annotated member of a union, e.g. ``int >= 1 | "auto"``
        return any(
            isinstance(m, bounds)
            for arg in get_args(field.annotation)
            for m in getattr(arg, "__metadata__", ())
        )

    unbounded = [
        f"{cls.__name__}.{name}"
        for cls in _sections()
        for name, field in cls.model_fields.items()
        if numeric(field.annotation) and not bounded(field)
    ]
    assert len(_sections()) >= 10 and not unbounded, unbounded


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("pretrain", {"adam_beta1": 1.5}, r"params.yaml: pretrain.adam_beta1=1.5: Input should"),
        ("pretrain", {"weight_decay": -1}, r"params.yaml: pretrain.weight_decay=-1: Input should"),
        ("finetune", {"grad_clip": -1}, r"params.yaml: finetune.grad_clip=-1: Input should"),
        ("trainer", {"threads": 0}, r"params.yaml: trainer.threads=0: Input should be greater"),
        (
            "pretrain",
            {"max_steps": None, "max_epochs": None},
            r"params.yaml: pretrain.max_steps/max_epochs: set one",
        ),
        ("model", {"n_heads": 3}, r"params.yaml: model.d_model/n_heads: d_model=128 is not"),
    ],
)
def test_training_params_errors_name_the_key_first(
    tmp_path: Path, section: str, values: dict, message: str
) -> None:
    from pipeline.encoder.model import ModelParams
    from pipeline.encoder.params import TrainerParams
    from pipeline.stages.finetune import FinetuneParams
    from pipeline.stages.pretrain import PretrainParams

    classes = {
        "pretrain": PretrainParams,
        "finetune": FinetuneParams,
        "trainer": TrainerParams,
        "model": ModelParams,
    }
    path = _params_with(tmp_path, section, **values)
    with pytest.raises(PipelineError, match=message) as err:
        load_section(section, classes[section], path)
    text = str(err.value)
    assert "\n" not in text and len(text.split("params.yaml: ")[1]) < 100 and "{" not in text


def test_unknown_experiment_is_one_line() -> None:
    with pytest.raises(PipelineError) as err:
        compose(["experiment=nope"])
    text = str(err.value)
    assert "Could not find 'experiment/nope' (available: gpu, smoke)" in text
    assert "\n" not in text
