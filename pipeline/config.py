"""Params: compose ``conf/`` into ``params.yaml`` and load validated sections from it.

``conf/`` (Hydra groups) is the source of truth; ``params.yaml`` is its composition, made
exactly the way ``dvc exp run`` makes it (``dvc.utils.hydra.compose_and_dump``), and
committed because plain ``dvc repro`` reads it as it is. Stages never use
``@hydra.main``: each reads its own section through :func:`load_section`, which validates
it with a pydantic model defined next to the stage that uses it.

Regenerate ``params.yaml``::

    python -m pipeline.config                      # default config
    python -m pipeline.config experiment=smoke     # any Hydra overrides
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
PARAMS_FILE = Path("params.yaml")

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base for a params section: unknown keys and wrong types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / PARAMS_FILE)
    args = parser.parse_args(argv)
    args.output.write_text(compose(args.overrides), encoding="utf-8")
    print(f"wrote {args.output} from {CONF_DIR.name}/ with overrides {args.overrides or 'none'}")


if __name__ == "__main__":
    from pipeline.errors import run_stage

    run_stage(main)
