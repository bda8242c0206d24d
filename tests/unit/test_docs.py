"""Docs stay true: README documents every config key and names every stage the CLI has."""

import typing
from pathlib import Path

from kd3.config import PipelineConfig
from kd3.methods.selectors import SELECTORS
from kd3.stages import STAGES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _undocumented(section: str, keys) -> list[str]:
    rows = [line for line in README.splitlines() if line.startswith(f"| `{section}.")]
    return [f"{section}.{key}" for key in keys
            if not any(f"`{section}.{key}`" in row or f"`{key}`" in row for row in rows)]


def test_readme_documents_every_config_key():
    missing = []
    for section, field in PipelineConfig.model_fields.items():
        if section in ("source", "selectors"):
            continue
        model = next(a for a in typing.get_args(field.annotation) or (field.annotation,) if a is not type(None))
        missing += _undocumented(section, model.model_fields)
    assert not missing, f"README config reference lacks: {missing}"


def test_readme_documents_every_selector_and_its_parameters():
    missing = []
    for name in SELECTORS:
        if f"`{name}`" not in README:
            missing.append(name)
        missing += _undocumented(f"selectors.{name}", SELECTORS.get(name).params.model_fields)
    assert not missing, f"README lacks: {missing}"


def test_readme_names_every_stage():
    for name in STAGES:
        assert f"kd3 {name}" in README or f"make {name}" in README, name
