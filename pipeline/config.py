"""Params: compose ``conf/`` into ``params.yaml`` and load validated sections from it.

``conf/`` (Hydra groups) is the source of truth; ``params.yaml`` is its composition, made
exactly the way ``dvc exp run`` makes it (``dvc.utils.hydra.compose_and_dump``), and
committed because plain ``dvc repro`` reads it as it is. Stages never use
``@hydra.main``: each reads its own section through :func:`load_section`, which validates
it with a pydantic model defined next to the stage that uses it.

Each key is defined once: its meaning is the ``Field(description=...)`` of its section
class, its value comes from ``conf/`` (section fields have no Python defaults). The
params table of ``docs/params.md`` is generated from both.

Regenerate ``params.yaml`` (every section is validated first)::

    python -m pipeline.config                      # default config
    python -m pipeline.config experiment=smoke     # any Hydra overrides
    python -m pipeline.config --describe           # print the params table (markdown)
    python -m pipeline.config --write-docs         # refresh docs/params.md's params table
"""

from __future__ import annotations

import argparse
import importlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import PipelineError, first_line

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
PARAMS_FILE = Path("params.yaml")
PARAMS_DOC = ROOT / "docs" / "params.md"
TABLE_START = "<!-- params-table:start -->"
TABLE_END = "<!-- params-table:end -->"
SEED_DESCRIPTION = "Seeds every stage (splits, initial weights, batch order, folds)."

# Section name -> "module:Class", imported only when needed: each stage imports its own
# class alone (dvc.yaml lists its code deps per module), while `make params` and the docs
# need all of them.
SECTIONS: dict[str, str] = {
    "data": "pipeline.stages.fetch:DataParams",
    "tokenizer": "pipeline.stages.tokenize:TokenizerParams",
    "model": "pipeline.encoder.model:ModelParams",
    "pretrain": "pipeline.stages.pretrain:PretrainParams",
    "finetune": "pipeline.stages.finetune:FinetuneParams",
    "wide": "pipeline.stages.wide:WideParams",
    "blend": "pipeline.stages.blend:BlendParams",
    "trainer": "pipeline.encoder.params:TrainerParams",
    "baseline": "pipeline.stages.baseline:BaselineParams",
    "calibrate": "pipeline.stages.calibrate:CalibrateParams",
    "evaluate": "pipeline.stages.evaluate:EvaluateParams",
    "tracking": "pipeline.tracking:TrackingParams",
    "register": "pipeline.stages.register:RegisterParams",
    "gate": "pipeline.tools.gate:GateParams",
}

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base for a params section: unknown keys and wrong types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def section_class(name: str) -> type[Section]:
    """The params class of section ``name`` (imported on first use)."""
    module, _, cls = SECTIONS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def compose(overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> str:
    """Return the YAML text DVC's Hydra integration writes for these overrides.

    A bad override (an unknown group option such as ``experiment=nope``, a key that does
    not exist) is one :class:`PipelineError` line, not Hydra's traceback.
    """
    from dvc.utils.hydra import compose_and_dump
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "params.yaml"
            compose_and_dump(
                out, str(conf_dir.resolve()), None, "config", str(ROOT), overrides or []
            )
            return out.read_text(encoding="utf-8")
    except (HydraException, OmegaConfBaseException) as exc:
        first = first_line(exc)
        if isinstance(exc, MissingConfigException) and exc.options:
            first += f" (available: {', '.join(sorted(exc.options))})"
        raise PipelineError(f"{conf_dir.name}/: overrides {overrides}: {first}") from None
    finally:
        GlobalHydra.instance().clear()


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read the whole params file, with a clear error when it is missing or malformed."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run `make params` to create it)") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def describe_errors(exc: ValidationError, model: type[BaseModel], prefix: str) -> str:
    """Format pydantic errors as one line naming each key first, then what is allowed.

    Cross-field checks (``model_validator``) have no location: their messages start with
    the keys they are about, so the section's values are never dumped into the line.
    """
    parts = []
    for err in exc.errors():
        key = ".".join([prefix, *(str(p) for p in err["loc"])])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            parts.append(f"unknown key {key} (allowed keys: {allowed})")
        elif err["type"] == "missing":
            parts.append(f"missing key {key}")
        elif not err["loc"]:
            parts.append(f"{prefix}.{message}")
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            parts.append(f"{key}={shown}: {message}")
    return "; ".join(parts)


def load_section(name: str, model: type[M], path: Path = PARAMS_FILE) -> M:
    """Validate section ``name`` of the params file against ``model``."""
    params = read_params(path)
    if name not in params:
        raise PipelineError(f"{path}: missing section '{name}' (regenerate with `make params`)")
    try:
        return model.model_validate(params[name])
    except ValidationError as exc:
        raise PipelineError(f"{path}: {describe_errors(exc, model, name)}") from None


def load_seed(path: Path = PARAMS_FILE) -> int:
    """The global seed every stage uses."""
    seed = read_params(path).get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PipelineError(f"{path}: seed={seed!r}: expected a non-negative integer")
    return seed


def validate_params(params: dict[str, Any], source: str) -> None:
    """Check every section (and the seed) of a composed config, so a bad value fails at
    `make params` time, not hours later in the stage that reads it.

    The errors of every section are joined on one line, each naming its key first.
    """
    problems = [f"missing section '{name}'" for name in SECTIONS if name not in params]
    problems += [f"unknown section '{name}'" for name in params if name not in {*SECTIONS, "seed"}]
    seed = params.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(f"seed={seed!r}: expected a non-negative integer")
    for name in SECTIONS:
        if name not in params:
            continue
        model = section_class(name)
        try:
            model.model_validate(params[name])
        except ValidationError as exc:
            problems.append(describe_errors(exc, model, name))
    if problems:
        raise PipelineError(f"{source}: {'; '.join(problems)}")


def _field_rows(
    model: type[BaseModel], values: dict[str, Any], prefix: str = "", about: str = ""
) -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default value, description) for each field; a nested section's fields
    are flattened, their descriptions prefixed with the nested field's (``about: ...``)."""
    for key, field in model.model_fields.items():
        nested, description = field.annotation, field.description or ""
        # BaseModel, not Section: under `python -m pipeline.config` this module is __main__
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            yield from _field_rows(nested, values[key], f"{prefix}{key}.", f"{description}: ")
        else:
            yield f"{prefix}{key}", values[key], about + description


def _cell(text: str) -> str:
    """Text safe in a markdown table cell (no column breaks, no HTML tags)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _value(value: Any) -> str:
    """A default as it is written in conf/ (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def params_table(overrides: list[str] | None = None) -> str:
    """The markdown table of every param: key, value in the composition, description."""
    params = yaml.safe_load(compose(overrides))
    lines = ["| param | default | description |", "|---|---|---|"]
    lines.append(f"| `seed` | `{params['seed']}` | {SEED_DESCRIPTION} |")
    for name in SECTIONS:
        for key, value, description in _field_rows(section_class(name), params[name]):
            lines.append(f"| `{name}.{key}` | `{_cell(_value(value))}` | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def doc_with_table(doc: str, table: str) -> str:
    """``doc`` with the text between the params-table markers replaced by ``table``.

    Raises:
        PipelineError: if ``doc`` does not hold exactly one pair of markers.
    """
    pattern = re.compile(f"{re.escape(TABLE_START)}\n.*?{re.escape(TABLE_END)}", re.DOTALL)
    if len(pattern.findall(doc)) != 1:
        raise PipelineError(
            f"{PARAMS_DOC.relative_to(ROOT)}: expected one {TABLE_START} ... {TABLE_END} block"
        )
    return pattern.sub(lambda _: f"{TABLE_START}\n{table}{TABLE_END}", doc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / PARAMS_FILE)
    parser.add_argument(
        "--describe", action="store_true", help="print the params table (markdown), write nothing"
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="replace docs/params.md's params table"
    )
    args = parser.parse_args(argv)
    if args.describe:
        print(params_table(args.overrides), end="")
        return
    if args.write_docs:
        doc = PARAMS_DOC.read_text(encoding="utf-8")
        PARAMS_DOC.write_text(doc_with_table(doc, params_table()), encoding="utf-8")
        print(f"wrote the params table of {PARAMS_DOC.relative_to(ROOT)}")
        return
    text = compose(args.overrides)
    validate_params(yaml.safe_load(text), f"{CONF_DIR.name}/: overrides {args.overrides}")
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} from {CONF_DIR.name}/ with overrides {args.overrides or 'none'}")


if __name__ == "__main__":
    from pipeline.errors import run_stage

    run_stage(main)
