"""The benchmark's spec stays true to the pipelines: its default method is what they train by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd3.bench.spec import load_spec
from kd3.config import load_config
from kd3.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "benchmarks" / "quality.yaml"


@pytest.mark.parametrize("scenario", ["demo", "hard"])
def test_the_default_method_is_what_the_pipeline_trains_by_default(scenario):
    spec = load_spec(SPEC)
    config = REPO / spec.scenarios[scenario].config
    method = spec.methods[spec.default_method]
    by_default = load_config(config, spec.recipe)
    as_benchmarked = load_config(config, [*spec.recipe, *method.overrides])
    for section in ("train", "kd3", "selectors"):
        assert by_default.section(section) == as_benchmarked.section(section), section
    # and the pipeline's own recipe keys equal the benchmark's (what `make demo` runs without overrides)
    plain = load_config(config)
    for key in ("epochs", "lr", "batch_size", "scheduler"):
        assert getattr(plain.train, key) == getattr(by_default.train, key), key


def test_every_method_and_scenario_config_is_valid():
    spec = load_spec(SPEC)
    for scenario in spec.scenarios.values():
        for method in spec.methods.values():
            load_config(REPO / scenario.config, [*spec.recipe, *method.overrides])


def test_spec_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenarios: {d: {config: x.yaml}}\nmethods: {a: {random_size_from: nope}}\n"
                   "reference_method: a\ndefault_method: a\n")
    with pytest.raises(ConfigError, match="random_size_from"):
        load_spec(bad)


GTN_SPEC = REPO / "benchmarks" / "generic_teacher.yaml"


def test_generic_teacher_spec_pairs_each_student_with_both_teachers():
    spec = load_spec(GTN_SPEC)
    assert spec.section == "generic-teacher" and spec.section != load_spec(SPEC).section
    plain = {m: spec.methods[m] for m in spec.methods if m.startswith("plain-")}
    assert len(plain) == 3
    for name, method in plain.items():
        generic = spec.methods[name.replace("plain-", "generic-")]
        assert generic.overrides == method.overrides  # the same student and KD³ settings, only the teacher differs
        assert method.stages == [] and generic.stages == ["prepare-teacher"]
        assert "score.teacher={run}/prepare-teacher/teacher.pt" in generic.scenario_overrides
        # the KD³ settings of the default method of the quality benchmark
        quality = load_spec(SPEC)
        assert method.overrides[:5] == quality.methods[quality.default_method].overrides
        for scenario in spec.scenarios.values():
            cfg = load_config(REPO / scenario.config, [*spec.recipe, *method.overrides, *generic.scenario_overrides])
            assert cfg.score.teacher.endswith("prepare-teacher/teacher.pt")


def test_method_stages_must_be_stages_that_can_run_before_score(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("scenarios: {demo: {config: pipelines/demo.yaml}}\n"
                    "methods: {default: {stages: [score]}, kd-all: {}}\n")
    with pytest.raises(ConfigError, match="methods.default: stages: 'score' is not a stage"):
        load_spec(path)


def test_teachers_table_and_own_section(tmp_path):
    from kd3.bench import report

    rows = {"plain": {"seconds": [10.0, 14.0]}, "generic": {"seconds": [20.0]}}
    teachers = {"demo": {"methods": ["plain"], "private_top1": 0.99, "shifted_top1": 0.7, "stage_seconds": {}},
                "variant-1": {"methods": ["generic"], "private_top1": 0.98, "shifted_top1": 0.75,
                              "stage_seconds": {"prepare-teacher": 30.0}}}
    lines = report.teachers_table(teachers, rows).splitlines()
    assert lines[2] == "| demo | plain | 0.990 | 0.700 | — | 12.0 | — |"
    assert lines[3] == "| variant-1 | generic | 0.980 | 0.750 | prepare-teacher 30 | 20.0 | 1.50 |"
    out = tmp_path / "B.md"
    report.write_section(out, "quality body")
    report.write_section(out, "gtn body", "generic-teacher")
    report.write_section(out, "new gtn body", "generic-teacher")
    text = out.read_text()
    assert "quality body" in text and "new gtn body" in text and "\ngtn body" not in text
    assert text.index(report.markers("quality")[1]) < text.index(report.markers("generic-teacher")[0])
