"""Which prediction sets the registered model serves: params of section ``register``.

``evaluate`` reports the same method and variant as its headline, so it reads these two
keys of ``register`` without the rest of that section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from pipeline.config import PARAMS_FILE, Section, describe_errors, read_params
from pipeline.errors import PipelineError


class SetChoice(Section):
    """The conformal method and variant of the served ``prediction_set`` column."""

    set_method: Literal["lac", "aps"] = Field(
        description="Conformal score of the served prediction sets: lac (1 - probability of "
        "the class: the smallest sets on average) or aps (cumulative probability: sets grow "
        "on hard posts). Fixed here, never chosen on test scores (docs/conformal.md)."
    )
    set_variant: Literal["marginal", "mondrian"] = Field(
        description="One threshold for every class (marginal), or one per class (mondrian: "
        "coverage per class, falling back to the marginal one for a class with too few "
        "validation posts)."
    )


def load_set_choice(path: Path = PARAMS_FILE) -> SetChoice:
    """``register.set_method`` and ``register.set_variant`` of the params file.

    Raises:
        PipelineError: one line naming a missing or invalid key.
    """
    register = read_params(path).get("register")
    if not isinstance(register, dict):
        raise PipelineError(f"{path}: missing section 'register' (regenerate with `make params`)")
    values = {key: register[key] for key in SetChoice.model_fields if key in register}
    try:
        return SetChoice.model_validate(values)
    except ValidationError as exc:
        raise PipelineError(f"{path}: {describe_errors(exc, SetChoice, 'register')}") from None
