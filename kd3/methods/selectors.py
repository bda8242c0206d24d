"""The selector registry: named rules that choose which pool samples a student trains on.

A selector is a pure function ``fn(inputs: SelectionInputs, params) -> SelectionResult`` over the
scored pool (cached teacher logits, and the student's logits when it needs them), registered with
its own parameter model (the ``selectors.<name>`` config section) — in the spirit of DataComp's
``baselines.py``: one function per rule, listed in one table. Adding a rule is one decorated
function in any module that is imported before the config is read::

    class TopKParams(Params):
        k: int = Field(default=100, ge=1)

    @register_selector("teacher_top_k", TopKParams)
    def teacher_top_k(inputs, params):
        \"\"\"The k most confident samples of the teacher.\"\"\"
        ...

The train stage runs a selector every epoch (the student's pool pass only for selectors that
need it); the select stage runs one stand-alone pass (``epoch`` None). Pure torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
from pydantic import Field, model_validator

from kd3.methods.selection import (SelectionResult, _confidence_and_label, alpha_schedule, select_by_teacher_confidence,
                                   select_dynamic)
from kd3.params import Params
from kd3.registry import Registry


@dataclass
class SelectionInputs:
    """What a selector may look at. Shapes: N pool samples, K classes."""

    #: cached teacher logits [N, K] (score stage)
    teacher_logits: torch.Tensor
    #: the current student's logits [N, K] on un-augmented pool images, when the selector needs them
    student_logits: Optional[torch.Tensor] = None
    #: 0-based training epoch; None for a stand-alone pass (the select stage)
    epoch: Optional[int] = None
    total_epochs: Optional[int] = None
    #: the run's seed (for randomised rules)
    seed: int = 0
    #: the teacher's BatchNorm in-domain score [N] (lower = more in-domain; score cache), None
    #: for a teacher without BatchNorm; and the same per BN layer [N, L]
    bn_score: Optional[torch.Tensor] = None
    bn_per_layer: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Selector:
    name: str
    fn: Callable[[SelectionInputs, Params], SelectionResult]
    params: type[Params]
    #: whether this selector, with these parameters, needs the student's pool pass
    needs_student: Callable[[Params], bool]
    #: whether it reads the teacher's BatchNorm in-domain score (teachers with BatchNorm only)
    needs_bn: bool = False

    def __call__(self, inputs: SelectionInputs, params: Params) -> SelectionResult:
        return self.fn(inputs, params)


SELECTORS: Registry[Selector] = Registry("selector")


class NoParams(Params):
    """A selector without parameters."""


def register_selector(name: str, params: type[Params] = NoParams,
                      needs_student: Union[bool, Callable[[Params], bool]] = False, needs_bn: bool = False):
    """Decorator: register ``fn`` as selector ``name`` with its parameter model (see module doc)."""

    def add(fn: Callable[[SelectionInputs, Params], SelectionResult]):
        rule = needs_student if callable(needs_student) else (lambda _p, flag=bool(needs_student): flag)
        SELECTORS.register(name, Selector(name, fn, params, rule, needs_bn), doc=fn.__doc__ or name)
        return fn

    return add


def run_selector(selector: Selector, params: Params, inputs: SelectionInputs,
                 eligible: Optional[torch.Tensor] = None) -> SelectionResult:
    """Run ``selector`` over the pool, letting only ``eligible`` rows (bool [N]; None = all) be chosen.

    Ineligible rows (e.g. SWAD's held-out validation split) take no part: counts, thresholds and
    α come from a pass over the eligible rows only, and they are never selected; their labels and
    confidences (for the manifest) come from a pass over the whole pool.
    """
    if eligible is None or bool(eligible.all()):
        return selector(inputs, params)
    idx = torch.nonzero(eligible).flatten()
    sub = selector(_rows(inputs, idx), params)
    full = selector(inputs, params)
    mask = torch.zeros(len(inputs.teacher_logits), dtype=torch.bool)
    mask[idx] = sub.mask
    return SelectionResult(mask=mask, labels=full.labels, confidences=full.confidences, thresholds=sub.thresholds,
                           counts=sub.counts, selected_per_class=sub.selected_per_class,
                           fallback_used=sub.fallback_used, dominant_class=sub.dominant_class, alpha=sub.alpha)


def _rows(inputs: SelectionInputs, idx: torch.Tensor) -> SelectionInputs:
    def sub(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[idx]

    return SelectionInputs(teacher_logits=inputs.teacher_logits[idx], student_logits=sub(inputs.student_logits),
                           epoch=inputs.epoch, total_epochs=inputs.total_epochs, seed=inputs.seed,
                           bn_score=sub(inputs.bn_score), bn_per_layer=sub(inputs.bn_per_layer))


def _teacher_predictions(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(confidences, labels, samples per teacher class) of the teacher's own predictions."""
    conf, labels = _confidence_and_label(teacher_logits.detach())
    return conf, labels, torch.bincount(labels, minlength=teacher_logits.shape[1])


def _whole_mask_result(mask: torch.Tensor, teacher_logits: torch.Tensor) -> SelectionResult:
    """A rule that ignores confidence: teacher predictions for the manifest, no thresholds."""
    conf, labels, per_class = _teacher_predictions(teacher_logits)
    return SelectionResult(mask=mask, labels=labels, confidences=conf,
                           thresholds=torch.zeros(teacher_logits.shape[1]), counts=per_class,
                           selected_per_class=torch.bincount(labels[mask], minlength=teacher_logits.shape[1]),
                           fallback_used=False, dominant_class=None)


def _exactly_one(params: Params, first: str, second: str) -> Params:
    if (getattr(params, first) is None) == (getattr(params, second) is None):
        raise ValueError(f"set exactly one of {first} and {second}")
    return params


# ----------------------------------------------------------------------------------- the selectors
@register_selector("all")
def select_all(inputs: SelectionInputs, params: NoParams) -> SelectionResult:
    """Every pool sample (KD on the whole pool; KD³ without selection)."""
    return _whole_mask_result(torch.ones(len(inputs.teacher_logits), dtype=torch.bool), inputs.teacher_logits)


class RandomParams(Params):
    #: share of the pool to keep (exactly one of fraction / count)
    fraction: Optional[float] = Field(default=None, gt=0, le=1)
    #: number of samples to keep
    count: Optional[int] = Field(default=None, ge=1)
    #: the subset's seed, added to run.seed (the same subset every epoch)
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> "RandomParams":
        return _exactly_one(self, "fraction", "count")


@register_selector("random", RandomParams)
def select_random(inputs: SelectionInputs, params: RandomParams) -> SelectionResult:
    """A uniformly random subset of fixed size, the same in every epoch (the random-web-subset baseline)."""
    n = len(inputs.teacher_logits)
    size = params.count if params.count is not None else round(params.fraction * n)
    size = max(1, min(n, size))
    generator = torch.Generator().manual_seed(inputs.seed * 1_000_003 + params.seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:size]] = True
    return _whole_mask_result(mask, inputs.teacher_logits)


class TeacherConfidenceParams(Params):
    #: keep samples whose teacher max-softmax is at least this
    threshold: float = Field(default=0.9, ge=0, le=1)
    #: keep at most this many (most confident) samples per teacher class; None: no cap
    per_class_cap: Optional[int] = Field(default=None, ge=1)


@register_selector("teacher_confidence", TeacherConfidenceParams)
def select_teacher_confidence(inputs: SelectionInputs, params: TeacherConfidenceParams) -> SelectionResult:
    """Teacher max-softmax ≥ threshold, optionally capped per class (the teacher-confident baseline)."""
    return select_by_teacher_confidence(inputs.teacher_logits, params.threshold, params.per_class_cap)


class Kd3DynamicParams(Params):
    #: base confidence threshold of the class-adaptive thresholds (METHODS.md §1a)
    threshold: float = Field(default=0.95, gt=0, le=1)
    #: teacher weight α of the combined logits; None: the schedule of ``alpha_mode`` (a stand-alone
    #: select pass has no epoch and needs a number; 1 = teacher only, no student pass)
    alpha: Optional[float] = Field(default=None, ge=0, le=1)
    #: α schedule: "reference" (relative to the run, cut at half), "absolute" (240-epoch constants),
    #: "smooth" (relative, no cut)
    alpha_mode: Literal["reference", "absolute", "smooth"] = "reference"
    #: lower bound of every class threshold (0 = paper; guards against thresholds → 0 for rare classes)
    threshold_floor: float = Field(default=0.0, ge=0, le=1)
    #: cap on any class's share of the selected set (None = paper)
    max_class_share: Optional[float] = Field(default=None, gt=0, le=1)


def _kd3_needs_student(params: Kd3DynamicParams) -> bool:
    return params.alpha is None or params.alpha < 1


@register_selector("kd3_dynamic", Kd3DynamicParams, needs_student=_kd3_needs_student)
def select_kd3_dynamic(inputs: SelectionInputs, params: Kd3DynamicParams) -> SelectionResult:
    """KD³'s rule: combined teacher+student predictions against class-adaptive thresholds (METHODS.md §1a)."""
    if params.alpha is not None:
        alpha = params.alpha
    elif inputs.epoch is None or inputs.total_epochs is None:
        raise ValueError("kd3_dynamic in a stand-alone pass has no epoch for its α schedule: "
                         "set selectors.kd3_dynamic.alpha")
    else:
        alpha = alpha_schedule(inputs.epoch, inputs.total_epochs, params.alpha_mode)
    return select_dynamic(inputs.teacher_logits, inputs.student_logits if alpha < 1 else None, alpha,
                          threshold=params.threshold, threshold_floor=params.threshold_floor,
                          max_class_share=params.max_class_share)


class DfndParams(Params):
    #: samples to keep in all, split evenly over the teacher's classes (exactly one of fraction / per_class)
    fraction: Optional[float] = Field(default=None, gt=0, le=1)
    #: samples to keep per teacher class
    per_class: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> "DfndParams":
        return _exactly_one(self, "fraction", "per_class")


@register_selector("dfnd_topk", DfndParams)
def select_dfnd_topk(inputs: SelectionInputs, params: DfndParams) -> SelectionResult:
    """DFND-style one-shot choice: per teacher class, the k samples of lowest teacher cross-entropy
    with its own pseudo-label (= highest max-softmax), k = fraction·N/K or per_class; a class with
    fewer samples keeps all of them (Chen et al., "Learning Student Networks in the Wild", 2021)."""
    logits = inputs.teacher_logits
    n, k = logits.shape
    per_class = params.per_class if params.per_class is not None else max(1, round(params.fraction * n / k))
    conf, labels, counts = _teacher_predictions(logits)
    mask = torch.zeros(n, dtype=torch.bool)
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        if len(members):
            order = torch.sort(conf[members], descending=True, stable=True).indices[:per_class]
            mask[members[order]] = True
    return SelectionResult(mask=mask, labels=labels, confidences=conf, thresholds=torch.zeros(k), counts=counts,
                           selected_per_class=torch.bincount(labels[mask], minlength=k), fallback_used=False,
                           dominant_class=None)


# ------------------------------------------------------------------ BatchNorm in-domain selectors
def _bn_signal(inputs: SelectionInputs, layers: Optional[list[int]]) -> torch.Tensor:
    """The BN in-domain score [N] (lower = more in-domain): the cached one, or the mean of the
    chosen per-layer columns."""
    if inputs.bn_score is None:
        raise ValueError("needs the teacher's BatchNorm in-domain score, and this teacher has no BatchNorm2d layer")
    if layers is None:
        return inputs.bn_score.float()
    width = inputs.bn_per_layer.shape[1]
    bad = [i for i in layers if not 0 <= i < width]
    if bad:
        raise ValueError(f"layers {bad} out of range: the teacher has {width} BatchNorm layers (0..{width - 1})")
    return inputs.bn_per_layer[:, layers].float().mean(1)


class BnQuantileParams(Params):
    #: a teacher without BatchNorm has no BN score: "all" trains on every sample instead (confidence
    #: rankings are inverted on web pools, so no selection beats a wrong one), "error" refuses
    fallback: Literal["all", "error"] = "all"
    #: keep this share of the pool: the samples with the lowest BN score
    fraction: float = Field(default=0.5, gt=0, le=1)
    #: take the share within each teacher class (keeps every class represented)
    class_balanced: bool = False
    #: BN layers (0-based, as in the score cache's bn_per_layer) whose scores are averaged; None: all
    layers: Optional[list[int]] = None


@register_selector("bn_quantile", BnQuantileParams, needs_bn=True)
def select_bn_quantile(inputs: SelectionInputs, params: BnQuantileParams) -> SelectionResult:
    """The share of the pool the teacher's BatchNorm statistics find most in-domain (METHODS.md §6),
    overall or per teacher class; the same every epoch."""
    signal = _bn_signal(inputs, params.layers)
    conf, labels, counts = _teacher_predictions(inputs.teacher_logits)
    n, k = inputs.teacher_logits.shape
    mask = torch.zeros(n, dtype=torch.bool)
    groups = [torch.nonzero(labels == c).flatten() for c in range(k)] if params.class_balanced else [torch.arange(n)]
    for members in groups:
        keep = max(1, round(params.fraction * len(members))) if len(members) else 0
        order = torch.sort(signal[members], stable=True).indices[:keep]
        mask[members[order]] = True
    return SelectionResult(mask=mask, labels=labels, confidences=conf, thresholds=torch.zeros(k), counts=counts,
                           selected_per_class=torch.bincount(labels[mask], minlength=k), fallback_used=False,
                           dominant_class=None)


class BnSoftParams(Params):
    #: a teacher without BatchNorm has no BN score: "all" trains on every sample instead (confidence
    #: rankings are inverted on web pools, so no selection beats a wrong one), "error" refuses
    fallback: Literal["all", "error"] = "all"
    #: the BN-score quantile where a sample's keep probability is 1/2
    fraction: float = Field(default=0.5, gt=0, lt=1)
    #: width of the logistic in units of the scores' inter-quartile range (smaller = harder cut)
    temperature: float = Field(default=0.25, gt=0)
    #: floor on every sample's keep probability (off-domain images still carry the teacher's function)
    min_prob: float = Field(default=0.0, ge=0, le=1)
    #: BN layers to average (as in bn_quantile); None: all
    layers: Optional[list[int]] = None


@register_selector("bn_soft", BnSoftParams, needs_bn=True)
def select_bn_soft(inputs: SelectionInputs, params: BnSoftParams) -> SelectionResult:
    """Soft BN selection: every epoch each sample is drawn with probability
    p_i = max(min_prob, σ((q − s_i) / (temperature · IQR))), q the ``fraction`` quantile of the BN scores
    s — in-domain samples nearly always, off-domain ones sometimes (seeded by run seed and epoch)."""
    signal = _bn_signal(inputs, params.layers).double()
    conf, labels, counts = _teacher_predictions(inputs.teacher_logits)
    n, k = inputs.teacher_logits.shape
    q1, q, q3 = torch.quantile(signal, torch.tensor([0.25, params.fraction, 0.75], dtype=torch.float64))
    scale = max(float(q3 - q1), 1e-12) * params.temperature
    prob = torch.sigmoid((q - signal) / scale).clamp_min(params.min_prob)
    epoch = -1 if inputs.epoch is None else inputs.epoch
    generator = torch.Generator().manual_seed(inputs.seed * 1_000_003 + 7919 * (epoch + 1))
    mask = torch.rand(n, generator=generator, dtype=torch.float64) < prob
    return SelectionResult(mask=mask, labels=labels, confidences=conf, thresholds=torch.zeros(k), counts=counts,
                           selected_per_class=torch.bincount(labels[mask], minlength=k), fallback_used=False,
                           dominant_class=None)
