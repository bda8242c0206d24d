"""Config loading: unknown keys, wrong types, missing files and overrides give one-line errors."""

from pathlib import Path

import pytest
import yaml

from kd3.config import PipelineConfig, load_config, require_file, resolve_path
from kd3.errors import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def demo_data() -> dict:
    return yaml.safe_load(DEMO.read_text())


def test_demo_config_is_valid_and_typed():
    cfg = load_config(DEMO)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.epochs >= 1 and isinstance(cfg.train.lr, float)
    assert cfg.download.serve_root == "{run}/demo-data/web"


def test_unknown_key_names_key_and_file(tmp_path):
    data = demo_data()
    data["train"]["epochz"] = 3
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "train.epochz" in message and "unknown key" in message
    assert "\n" not in message


def test_wrong_type_names_key_and_value(tmp_path):
    data = demo_data()
    data["train"]["epochs"] = "ten"
    with pytest.raises(ConfigError, match=r"train\.epochs.*'ten'"):
        load_config(write(tmp_path, data))


def test_a_section_with_required_keys_may_be_left_out_but_not_half_written(tmp_path):
    data = demo_data()
    del data["score"]
    assert load_config(write(tmp_path, data)).score is None  # only the stages reading it refuse to run
    data["score"] = {"batch_size": 8}
    with pytest.raises(ConfigError, match="missing required key 'score.teacher'"):
        load_config(write(tmp_path, data))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_overrides_are_yaml_typed_and_validated():
    cfg = load_config(DEMO, ["train.epochs=3", "run.device=cpu", "selectors.teacher_confidence.per_class_cap=50"])
    assert cfg.train.epochs == 3 and cfg.run.device == "cpu"
    assert cfg.selector_params("teacher_confidence").per_class_cap == 50
    with pytest.raises(ConfigError, match=r"with overrides train\.epochs=-1.*train\.epochs"):
        load_config(DEMO, ["train.epochs=-1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DEMO, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(DEMO, ["train.nope=1"])


def test_png_quality_is_checked_before_work(tmp_path):
    with pytest.raises(ConfigError, match="png is a compression level"):
        load_config(DEMO, ["download.encode_quality=95"])
    assert load_config(DEMO).download.resolved_encode_quality == 3


def test_fingerprint_ignores_runtime_keys_but_not_semantics():
    base = load_config(DEMO)
    faster = load_config(DEMO, ["score.num_workers=4"])
    different = load_config(DEMO, ["score.teacher=other.pt"])
    assert base.fingerprint("score") == faster.fingerprint("score")
    assert base.fingerprint("score") != different.fingerprint("score")


def test_run_placeholder_and_require_file(tmp_path):
    cfg = load_config(DEMO)
    assert resolve_path("{run}/x.pt", tmp_path) == tmp_path / "x.pt"
    with pytest.raises(ConfigError, match=r"score\.teacher: file not found"):
        require_file(cfg, "score.teacher", tmp_path / "missing.pt", "hint")
