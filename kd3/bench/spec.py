"""The benchmark's config: scenarios (a pipeline each), methods (named override sets), seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from kd3.errors import ConfigError
from kd3.params import Params


class Scenario(Params):
    #: the pipeline YAML whose demo-data → download → score stages build this scenario's pool
    config: str
    #: overrides of that pipeline for this scenario (every stage)
    overrides: list[str] = Field(default_factory=list)
    #: extra overrides in quick mode (a tiny pool, few epochs)
    quick_overrides: list[str] = Field(default_factory=list)
    #: ground truth beside the pool (URL-list columns, never given to a method): a sample is
    #: in-domain when ``in_domain_column == in_domain_value``; ``label_column`` holds its true class
    in_domain_column: str = "source"
    in_domain_value: str = "mnist"
    label_column: str = "demo_label"
    #: the evaluation datasets (names in the pipeline's evaluate.datasets) reported as headline
    private_dataset: str = "private_test"
    shifted_dataset: str = "mnist_shifted"


class Method(Params):
    #: what the method is, for the tables
    description: str = ""
    #: config overrides of the train stage (after the benchmark's recipe)
    overrides: list[str] = Field(default_factory=list)
    #: the random-subset baseline: selectors.random.count = the mean selection size of this method
    #: (same seed), so random and that method train on equally many samples
    random_size_from: Optional[str] = None
    #: "private_data": the student trained with labels on the teacher's own training data — the
    #: ceiling, not a data-free baseline
    reference: Optional[Literal["private_data"]] = None
    #: whether the default must beat this method (false for tuning variants of the default itself,
    #: which are shown in the tables and named in the verdict, but are not baselines)
    baseline: bool = True
    #: overrides of every upstream stage for this method (e.g. the teacher score distils from:
    #: score.teacher=...): its cells then run in their own run folder beside the scenario's
    #: (RUNS/<scenario>/variant-<hash>/), which shares the scenario's demo-data and download stages
    scenario_overrides: list[str] = Field(default_factory=list)
    #: stages run in that folder before score (e.g. [prepare-teacher]); their time is reported
    stages: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stages_known(self) -> "Method":
        from kd3.stages import STAGES

        unknown = [s for s in self.stages if s not in STAGES or s in ("demo-data", "download", "score")]
        if unknown:
            raise ValueError(f"stages: {unknown[0]!r} is not a stage that runs before score in a method's own run "
                             f"folder (known stages: {', '.join(STAGES)}; demo-data, download and score always run)")
        return self


class Quick(Params):
    seeds: list[int] = Field(default_factory=lambda: [0])
    methods: list[str] = Field(default_factory=list)
    scenarios: list[str] = Field(default_factory=list)


class BenchSpec(Params):
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    #: overrides every method trains with (the recipe tuned once on KD-all)
    recipe: list[str] = Field(default_factory=list)
    #: the weight average reported beside the last epoch (kept by every training run)
    averaging_mode: Literal["wakd", "sma"] = "wakd"
    #: the method every other is compared with for train time and the gap closed
    reference_method: str = "kd-all"
    #: the configuration the pipelines train by default (make demo); marked in the tables
    default_method: str = "default"
    #: print the default's margin over the data-free baselines (off for studies such as the recipe's)
    verdict: bool = True
    #: the BENCHMARKS.md section this spec rewrites (between its own markers) and its heading
    section: str = Field(default="quality", pattern=r"^[a-z0-9-]+$")
    title: str = "Distillation quality"
    scenarios: dict[str, Scenario]
    methods: dict[str, Method]
    quick: Quick = Field(default_factory=Quick)

    @model_validator(mode="after")
    def _names_exist(self) -> "BenchSpec":
        for name, method in self.methods.items():
            if method.random_size_from is not None and method.random_size_from not in self.methods:
                raise ValueError(f"methods.{name}.random_size_from: no method {method.random_size_from!r}")
        for key in ("reference_method", "default_method"):
            if getattr(self, key) not in self.methods:
                raise ValueError(f"{key}: no method {getattr(self, key)!r}")
        for name in self.quick.methods:
            if name not in self.methods:
                raise ValueError(f"quick.methods: no method {name!r}")
        for name in self.quick.scenarios:
            if name not in self.scenarios:
                raise ValueError(f"quick.scenarios: no scenario {name!r}")
        return self

    def ordered_methods(self, names: list[str]) -> list[str]:
        """Methods in an order where each random baseline runs after the method it is sized from."""
        done: list[str] = []
        pending = list(names)
        while pending:
            for name in pending:
                source = self.methods[name].random_size_from
                if source is None or source in done or source not in names:
                    done.append(name)
                    pending.remove(name)
                    break
            else:
                raise ConfigError(f"methods: random_size_from forms a cycle among {pending}")
        return done


def load_spec(path: str | Path) -> BenchSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return BenchSpec.model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise ConfigError(f"{path}: {key}: {err['msg'].removeprefix('Value error, ')}") from None
