"""The base of every typed settings model: config sections and the parameters of registered methods.

A leaf module, so registries of pure methods (selectors) can declare their parameters without
importing the pipeline config, and the config can validate them without import circles.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
