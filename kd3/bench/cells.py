"""One benchmark cell = (scenario, method, seed): train with the pipeline's own stages, then measure.

Upstream stages (demo-data → download → score) run once per scenario in ``RUNS/<scenario>/`` and
are shared by every cell; a cell trains into ``train-<method>-s<seed>/`` with ``run.seed`` = the
seed (so only the student's initialisation, data order and augmentation change between seeds),
writes its weight average with the average stage, and its measured results to
``bench/<method>-s<seed>.json``. A cell whose results exist for the same settings is reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from kd3 import layout
from kd3.bench.spec import BenchSpec, Method, Scenario
from kd3.config import PipelineConfig, load_config, resolve_path
from kd3.data import eval_sets
from kd3.data.images import as_nchw_uint8, prepare_uint8
from kd3.errors import Kd3Error, RunFolderError
from kd3.inference import batch_logits
from kd3.inspect.manifests import epoch_manifests
from kd3.inspect.summary import summarize_manifest
from kd3.inspect.truth import GroundTruth, TruthSettings, load_ground_truth
from kd3.methods.fidelity import fidelity_report, topk_accuracy
from kd3.models import arch_options, build_model, load_model, save_checkpoint
from kd3.models.spec import ModelMeta
from kd3.runs import atomic_write_json, read_meta
from kd3.runtime import configure
from kd3.stages import STAGES
from kd3.stages.base import execute
from kd3.training.state import lr_factor

UPSTREAM = ("demo-data", "download", "score")
PRIVATE_TRAIN = "private_train.npz"


@dataclass
class ScenarioRun:
    """A scenario's run folder with its decoded evaluation sets and teacher logits (computed once)."""

    name: str
    scenario: Scenario
    run_dir: Path
    overrides: list[str]
    device: torch.device
    datasets: dict[str, tuple[list[Any], torch.Tensor]] = field(default_factory=dict)
    teacher_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    ground_truth: Optional[GroundTruth] = None
    #: seconds of the stages a method's own run folder runs before score (e.g. prepare-teacher)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def config(self, extra: list[str] = ()) -> PipelineConfig:
        return load_config(self.scenario.config, [*self.overrides, *extra])


def scenario_run(spec: BenchSpec, name: str, runs_dir: Path, quick: bool, device: torch.device,
                 log: Callable[[str], None]) -> ScenarioRun:
    """Build (or reuse, --resume style) the scenario's upstream stages and load what every cell needs."""
    scenario = spec.scenarios[name]
    run_dir = runs_dir / name
    url_list = run_dir / "urls.parquet"
    # the recipe first: a scenario (and quick mode) may change it, e.g. fewer epochs on a toy pool
    overrides = [*spec.recipe, *scenario.overrides, *(scenario.quick_overrides if quick else []),
                 f"run.device={device}", f"demo_data.url_list={url_list}", f"download.url_list={url_list}"]
    sr = ScenarioRun(name, scenario, run_dir, overrides, device)
    cfg = sr.config()
    for stage in UPSTREAM:
        started = time.monotonic()
        execute(STAGES[stage], cfg, run_dir, "resume", argv=["kd3 bench", stage])
        log(f"[bench] {name}: {stage} ready ({time.monotonic() - started:.0f}s)")
    teacher_meta = _teacher_logits(sr, cfg, resolve_path(cfg.evaluate.teacher, run_dir))
    for key in ("private_dataset", "shifted_dataset"):
        if getattr(scenario, key) not in sr.datasets:
            raise Kd3Error(f"scenario {name}: {key} {getattr(scenario, key)!r} is not among the pipeline's "
                           f"evaluate.datasets ({', '.join(sr.datasets)})")
    settings = TruthSettings(column=scenario.in_domain_column, in_domain_value=scenario.in_domain_value,
                             label_column=scenario.label_column)
    sr.ground_truth, note = load_ground_truth(run_dir, settings, teacher_meta.class_names)
    if sr.ground_truth is None or sr.ground_truth.true_label is None:
        raise Kd3Error(f"scenario {name}: {note}")
    return sr


def _teacher_logits(sr: ScenarioRun, cfg: PipelineConfig, teacher_path: Path) -> ModelMeta:
    """Decode the evaluation sets (once per scenario) and the teacher's logits on them."""
    teacher, teacher_meta, _ = load_model(teacher_path, sr.device)
    for d in cfg.evaluate.datasets:
        if d.name in sr.datasets:
            sr.teacher_logits[d.name] = logits_on(teacher, teacher_meta, sr.datasets[d.name][0], sr.device)
            continue
        data = eval_sets.open_eval_set(d.name, resolve_path(d.path, sr.run_dir), teacher_meta.class_names, d.format,
                                       d.label_key)
        batches, labels = [], []
        for images, y in data.batches(cfg.evaluate.batch_size):
            batches.append(images)
            labels.append(y)
        sr.datasets[d.name] = (batches, torch.cat(labels))
        sr.teacher_logits[d.name] = logits_on(teacher, teacher_meta, batches, sr.device)
    return teacher_meta


def variant_run(base: ScenarioRun, method: Method, log: Callable[[str], None]) -> ScenarioRun:
    """The run folder of a method with its own upstream settings (``scenario_overrides``, ``stages``):
    ``RUN/variant-<hash>/`` with the scenario's demo-data and download linked in, then its own stages
    and score; the teacher measured is the one score distils from. Without either, the scenario's."""
    if not method.scenario_overrides and not method.stages:
        return base
    key = hashlib.sha256(json.dumps([method.scenario_overrides, method.stages]).encode()).hexdigest()[:8]
    run_dir = base.run_dir / f"variant-{key}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in UPSTREAM[:2]:  # shared, never rewritten by a variant
        link = run_dir / stage
        if not link.is_symlink():
            if link.exists():
                raise Kd3Error(f"{link} exists and is not a link to the scenario's {stage} stage; remove it")
            link.symlink_to((base.run_dir / stage).resolve(), target_is_directory=True)
    sr = ScenarioRun(base.name, base.scenario, run_dir, [*base.overrides, *method.scenario_overrides], base.device,
                     datasets=base.datasets, ground_truth=base.ground_truth)
    cfg = sr.config()
    for stage in [*method.stages, UPSTREAM[2]]:
        started = time.monotonic()
        _execute(stage, cfg, run_dir, ["kd3 bench", stage, *method.scenario_overrides], log)
        if stage != UPSTREAM[2]:
            sr.stage_seconds[stage] = float(read_meta(run_dir / STAGES[stage].NAME)["counts"]["seconds"])
        log(f"[bench] {base.name} ({run_dir.name}): {stage} ready ({time.monotonic() - started:.0f}s)")
    _teacher_logits(sr, cfg, resolve_path(cfg.score.teacher, run_dir))
    return sr


def teacher_summary(sr: ScenarioRun, methods: list[str]) -> dict[str, Any]:
    """The teacher of a run folder: its own private and shifted top-1, the stages that prepared it."""
    def top1(dataset: str) -> float:
        return topk_accuracy(sr.teacher_logits[dataset], sr.datasets[dataset][1], 1)

    return {"methods": methods, "private_top1": top1(sr.scenario.private_dataset),
            "shifted_top1": top1(sr.scenario.shifted_dataset), "stage_seconds": dict(sr.stage_seconds)}


def logits_on(model: torch.nn.Module, meta: ModelMeta, batches: list[Any], device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([batch_logits(model, meta.input, images, device) for images in batches])


def evaluate_model(sr: ScenarioRun, path: Path, n_bins: int = 15) -> dict[str, dict[str, float]]:
    """Top-1/top-5/ECE and agreement/KL with the teacher on every evaluation set of the scenario."""
    model, meta, _ = load_model(path, sr.device)
    out = {}
    for name, (batches, labels) in sr.datasets.items():
        z = logits_on(model, meta, batches, sr.device)
        out[name] = {k: float(v) for k, v in fidelity_report(z, sr.teacher_logits[name], labels, n_bins).items()}
    return out


def private_top1(sr: ScenarioRun, path: Path) -> float:
    model, meta, _ = load_model(path, sr.device)
    batches, labels = sr.datasets[sr.scenario.private_dataset]
    return topk_accuracy(logits_on(model, meta, batches, sr.device), labels, 1)


def selection_stats(sr: ScenarioRun, train_dir: Path, num_classes: int) -> list[dict[str, Any]]:
    """Per epoch: selection size, purity (in-domain share of the selected), in-domain recall and
    recall per true class — the selection manifests against the pool's ground truth, computed by
    the inspect stage's own streaming summary (one definition of purity and recall)."""
    stats = []
    for ref in epoch_manifests(sr.run_dir, train_dir.name):
        manifest, _ = summarize_manifest(ref, num_classes, truth=sr.ground_truth)
        truth = manifest.truth
        per_class = truth.class_recall if truth is not None else None
        stats.append({"selected": int(manifest.selected),
                      "purity": None if truth is None else truth.purity,
                      "in_domain_recall": None if truth is None else truth.recall,
                      "recall_per_class": None if per_class is None else
                      {str(k): (None if np.isnan(v) else float(v)) for k, v in enumerate(per_class)}})
    return stats


def cell_key(spec: BenchSpec, sr: ScenarioRun, method: Method, overrides: list[str]) -> str:
    """Settings fingerprint of a cell: the resolved training config (pipeline YAML + recipe + method,
    as the train stage fingerprints it), the upstream overrides and the method's own settings. A
    cached result is reused only for the same settings, also when the pipeline YAML changed."""
    cfg = sr.config(overrides)
    payload = json.dumps({"overrides": sr.overrides, "method": method.model_dump(exclude={"description"}),
                          "cell": overrides, "averaging": spec.averaging_mode,
                          "train": cfg.fingerprint(*STAGES["train"].sections(cfg))}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _execute(stage: str, cfg: PipelineConfig, run_dir: Path, argv: list[str], log: Callable[[str], None]) -> None:
    """Run a stage, continuing or reusing its folder; a folder written with other settings (the
    cell's settings changed since) is redone."""
    try:
        execute(STAGES[stage], cfg, run_dir, "resume", argv=argv)
    except RunFolderError as exc:
        log(f"[bench] {exc}: redoing it")
        execute(STAGES[stage], cfg, run_dir, "overwrite", argv=argv)


def run_cell(spec: BenchSpec, sr: ScenarioRun, name: str, seed: int, results: dict[tuple[str, int], dict],
             log: Callable[[str], None]) -> dict[str, Any]:
    """Train and measure one cell (or reuse its saved results)."""
    method = spec.methods[name]
    output = f"train-{name}-s{seed}"
    overrides = [*method.overrides, f"run.seed={seed}", f"train.output={output}",
                 f"averaging.modes=[{spec.averaging_mode}]"]
    if method.random_size_from is not None:
        source = results.get((method.random_size_from, seed), {})
        if "mean_selected" not in source:
            raise Kd3Error(f"method {name}: sized from {method.random_size_from}, which has no result for seed {seed}")
        overrides.append(f"selectors.random.count={max(1, round(source['mean_selected']))}")
    result_path = sr.run_dir / "bench" / f"{name}-s{seed}.json"
    key = cell_key(spec, sr, method, overrides)
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("key") == key:
            return cached
    started = time.monotonic()
    if method.reference == "private_data":
        result = _private_data_cell(sr, seed, output, overrides)
    else:
        result = _distillation_cell(sr, output, overrides, log)
    result.update(method=name, seed=seed, key=key, cell_seconds=round(time.monotonic() - started, 1))
    atomic_write_json(result_path, result)
    private = result["last"][sr.scenario.private_dataset]["top1"]
    log(f"[bench] {sr.name} {name} seed {seed}: private top-1 {private:.3f} ({result['cell_seconds']:.0f}s)")
    return result


def _distillation_cell(sr: ScenarioRun, output: str, overrides: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    cfg = sr.config(overrides)
    run_dir = sr.run_dir
    _execute("train", cfg, run_dir, ["kd3 bench", "train", *overrides], log)
    _execute("average", cfg, run_dir, ["kd3 bench", "average", *overrides], log)
    train_dir = run_dir / output
    average_dir = run_dir / STAGES["average"].output_name(cfg)
    meta = read_meta(train_dir)
    epochs = sorted(train_dir.glob("epoch_*.pt"))
    selection = selection_stats(sr, train_dir, sr.teacher_logits[sr.scenario.private_dataset].shape[1])
    sizes = [s["selected"] for s in selection]
    purities = [s["purity"] for s in selection if s["purity"] is not None]
    return {"last": evaluate_model(sr, train_dir / layout.LAST_CHECKPOINT),
            "averaged": evaluate_model(sr, average_dir / f"{cfg.averaging.modes[0]}.pt"),
            "private_top1_per_epoch": [private_top1(sr, p) for p in epochs],
            "selection": selection, "mean_selected": float(np.mean(sizes)) if sizes else None,
            "mean_purity": float(np.mean(purities)) if purities else None,
            "train_seconds": meta["counts"]["seconds"]}


def _private_data_cell(sr: ScenarioRun, seed: int, output: str, overrides: list[str]) -> dict[str, Any]:
    """The ceiling: the student trained with labels on the teacher's private training split, with the
    same recipe (optimiser, lr, schedule, epochs, batch) and the teacher's augmentation."""
    from kd3.data.demo import random_affine

    cfg = sr.config(overrides)
    t = cfg.train
    path = sr.run_dir / layout.DEMO_DATA / PRIVATE_TRAIN
    if not path.is_file():
        raise Kd3Error(f"{path} missing: the private-data reference needs the demo-data stage's private training "
                       "split; rerun `kd3 demo-data --overwrite` for this scenario")
    with np.load(path) as data:
        images, labels = as_nchw_uint8(data["images"]), torch.from_numpy(data["labels"].astype(np.int64))
    score_meta = ModelMeta.from_dict(read_meta(sr.run_dir / layout.SCORE)["teacher"])
    spec = score_meta.input
    device = configure(cfg.run)  # seeds everything with run.seed = this cell's seed
    model = build_model(t.student.arch, score_meta.num_classes, spec.channels, t.student.options,
                        image_size=spec.image_size).to(device)
    student_meta = ModelMeta(arch=t.student.arch, options=arch_options(model, t.student.options),
                             num_classes=score_meta.num_classes,
                             class_names=score_meta.class_names, input=spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    x_all = prepare_uint8(images, spec).float() / 255.0
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    out_dir = sr.run_dir / output
    out_dir.mkdir(parents=True, exist_ok=True)
    per_epoch = []
    started = time.monotonic()
    for epoch in range(t.epochs):
        for group in optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(t.scheduler, epoch, t.epochs, t.step_milestones)  # the recipe's schedule
        model.train()
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(order), t.batch_size):
            idx = order[start:start + t.batch_size]
            xb = ((random_affine(x_all[idx], gen) - mean) / std).to(device)
            loss = F.cross_entropy(model(xb), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        save_checkpoint(out_dir / layout.epoch_checkpoint(epoch), model, student_meta,
                        trained_on="private training split (reference, not data-free)")
        per_epoch.append(private_top1(sr, out_dir / layout.epoch_checkpoint(epoch)))
    seconds = time.monotonic() - started
    last = out_dir / layout.epoch_checkpoint(t.epochs - 1)
    result = evaluate_model(sr, last)
    return {"last": result, "averaged": result, "private_top1_per_epoch": per_epoch, "selection": [],
            "mean_selected": None, "mean_purity": None, "train_seconds": round(seconds, 2)}

