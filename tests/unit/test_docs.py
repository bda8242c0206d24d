"""Docs stay true: README documents every config key and names every stage the CLI has."""

from pathlib import Path

from kd3.config import PipelineConfig
from kd3.stages import STAGES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_documents_every_config_key():
    missing = []
    for section, field in PipelineConfig.model_fields.items():
        if section == "source":
            continue
        for key in field.annotation.model_fields:
            rows = [line for line in README.splitlines() if line.startswith(f"| `{section}.")]
            if not any(f"`{section}.{key}`" in row or f"`{key}`" in row for row in rows):
                missing.append(f"{section}.{key}")
    assert not missing, f"README config reference lacks: {missing}"


def test_readme_names_every_stage():
    for name in STAGES:
        assert f"kd3 {name}" in README or f"make {name}" in README, name
