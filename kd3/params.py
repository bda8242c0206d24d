"""The base of every typed settings model: config sections and the parameters of registered methods.

A leaf module, so registries of pure methods (selectors) can declare their parameters without
importing the pipeline config, and the config can validate them without import circles.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _leaf_types(annotation: Any) -> set[Any]:
    """The types an annotation allows at its top level (``Optional[int]`` → {int, NoneType})."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in args))
    return {annotation}


class Params(BaseModel):
    """Unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `train.epochs=true` is a typo, not one epoch
        if isinstance(value, bool):
            allowed = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in allowed and allowed & {int, float}:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value
