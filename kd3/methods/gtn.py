"""Generic teacher (GTN, METHODS.md §5): a weight-sharing student supernet and the joint objective.

Pure torch, no I/O. The student pool is finite: every (family, width multiplier, depth) of
:class:`StudentPool`. Each family has one supernet holding the largest network's weights; a
sub-network uses the leading slice of every tensor (the first ``round(m·C)`` channels of each layer,
the first ``depth`` convolutions or blocks of each stage), so all sub-networks of a family share
weights. A sub-network becomes an ordinary registry model (``small_cnn`` with ``widths`` /
``convs_per_stage``, ``cifar_resnet`` with ``widths`` / ``num_blocks``) by copying those slices
(:meth:`FamilySupernet.extract_state`).

BatchNorm: the supernet normalises with batch statistics only (it never keeps running statistics);
an extracted sub-network's running statistics are recalibrated on the owner's data
(:func:`recalibrate_bn`). Why not per-width BN statistics: with depth choices too, a layer's input
distribution depends on the whole configuration, not the width alone, and post-hoc recalibration
(as in US-Nets / BigNAS) is exact for every sub-network at the cost of one forward pass.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd3.models.cifar import BasicBlock

FAMILIES = ("small_cnn", "cifar_resnet")


@dataclass(frozen=True, order=True)
class SubnetConfig:
    """One student of the pool."""

    family: str
    width: float
    depth: int

    @property
    def name(self) -> str:
        return f"{self.family}-w{self.width:g}-d{self.depth}"


def scaled(base: Sequence[int], width: float) -> list[int]:
    """Channel counts of a width multiplier: round(m·C), at least 1."""
    return [max(1, int(round(c * width))) for c in base]


@dataclass(frozen=True)
class StudentPool:
    """The finite pool: families × width multipliers × depths (convs or blocks per stage)."""

    families: tuple[str, ...]
    widths: tuple[float, ...]
    depths: tuple[int, ...]
    small_cnn_widths: tuple[int, ...] = (16, 32, 64)
    resnet_widths: tuple[int, int, int, int] = (8, 16, 32, 64)

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {list(self.families)}")
        if not self.widths or any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"width multipliers must be in (0, 1], got {list(self.widths)}")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be >= 1, got {list(self.depths)}")
        if len(self.resnet_widths) != 4:
            raise ValueError(f"resnet_widths needs 4 stage widths, got {list(self.resnet_widths)}")

    def members(self) -> list[SubnetConfig]:
        return [SubnetConfig(f, w, d) for f, w, d in itertools.product(self.families, sorted(self.widths),
                                                                        sorted(self.depths))]

    def largest(self, family: str) -> SubnetConfig:
        return SubnetConfig(family, max(self.widths), max(self.depths))

    def smallest(self, family: str) -> SubnetConfig:
        return SubnetConfig(family, min(self.widths), min(self.depths))

    def sandwich(self, n_random: int, rng: random.Random) -> list[SubnetConfig]:
        """The sandwich rule per step: the largest and the smallest of every family, then ``n_random``
        members drawn uniformly from the whole pool (with replacement, as the rule is usually run)."""
        chosen = [c for f in self.families for c in (self.largest(f), self.smallest(f))]
        members = self.members()
        return chosen + [members[rng.randrange(len(members))] for _ in range(n_random)]

    def registry_model(self, cfg: SubnetConfig) -> tuple[str, dict]:
        """(registry arch name, options) of a pool member."""
        if cfg.family == "small_cnn":
            return "small_cnn", {"widths": scaled(self.small_cnn_widths, cfg.width), "convs_per_stage": cfg.depth}
        return "cifar_resnet", {"widths": scaled(self.resnet_widths, cfg.width), "num_blocks": [cfg.depth] * 4}


# ------------------------------------------------------------------------------- sliced primitives
def _conv(conv: nn.Conv2d, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    weight = conv.weight[:out_channels, :x.shape[1]]
    return F.conv2d(x, weight, None, conv.stride, conv.padding)


def _bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Batch statistics only (no running statistics: they are recalibrated per sub-network)."""
    c = x.shape[1]
    return F.batch_norm(x, None, None, bn.weight[:c], bn.bias[:c], training=True, eps=bn.eps)


def _linear(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, fc.weight[:, :x.shape[1]], fc.bias)


class FamilySupernet(nn.Module):
    """The largest network of a family; ``forward(x, cfg)`` runs the sub-network ``cfg``."""

    family: str

    def forward(self, x: torch.Tensor, cfg: SubnetConfig) -> torch.Tensor:
        raise NotImplementedError

    def key_map(self, cfg: SubnetConfig) -> dict[str, str]:
        """State-dict key of the extracted registry model → supernet key it is sliced from."""
        raise NotImplementedError

    def extract_state(self, cfg: SubnetConfig, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sub-network's weights for a registry model whose (fresh) state dict is ``target``: each
        supernet tensor cut to the target's shape (leading slice); BN running statistics and counters
        keep the target's fresh values (they are recalibrated afterwards)."""
        own = self.state_dict()
        mapping = self.key_map(cfg)
        state = {}
        for key, fresh in target.items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                state[key] = fresh.clone()
                continue
            if key not in mapping:
                raise KeyError(f"{cfg.name}: no supernet weight for {key}")
            source = own[mapping[key]]
            if source.dim() != fresh.dim() or any(s < t for s, t in zip(source.shape, fresh.shape)):
                raise ValueError(f"{cfg.name}: {key} {tuple(fresh.shape)} is not a slice of "
                                 f"{mapping[key]} {tuple(source.shape)}")
            state[key] = source[tuple(slice(0, n) for n in fresh.shape)].detach().clone()
        return state


class SmallCNNSupernet(FamilySupernet):
    """Slimmable :class:`kd3.models.small_cnn.SmallCNN`: stages of (conv-BN-ReLU)×depth, max-pool between."""

    family = "small_cnn"

    def __init__(self, pool: StudentPool, num_classes: int, in_channels: int):
        super().__init__()
        self.pool = pool
        widths, depth = pool.small_cnn_widths, max(pool.depths)
        self.stages = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            convs = nn.ModuleList()
            for j in range(depth):
                convs.append(nn.ModuleDict({"conv": nn.Conv2d(c_in if j == 0 else w, w, 3, padding=1, bias=False),
                                            "bn": nn.BatchNorm2d(w)}))
            self.stages.append(convs)
            c_in = w
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor, cfg: SubnetConfig) -> torch.Tensor:
        widths = scaled(self.pool.small_cnn_widths, cfg.width)
        for i, (stage, w) in enumerate(zip(self.stages, widths)):
            for layer in list(stage)[:cfg.depth]:
                x = F.relu(_bn(layer["bn"], _conv(layer["conv"], x, w)))
            if i < len(widths) - 1:
                x = F.max_pool2d(x, 2)
        return _linear(self.fc, x.mean(dim=(2, 3)))

    def key_map(self, cfg: SubnetConfig) -> dict[str, str]:
        # SmallCNN.features is one Sequential: per stage [conv, bn, relu] × depth, then a max-pool
        mapping, idx = {}, 0
        for i in range(len(self.pool.small_cnn_widths)):
            for j in range(cfg.depth):
                mapping[f"features.{idx}.weight"] = f"stages.{i}.{j}.conv.weight"
                for p in ("weight", "bias"):
                    mapping[f"features.{idx + 1}.{p}"] = f"stages.{i}.{j}.bn.{p}"
                idx += 3
            if i < len(self.pool.small_cnn_widths) - 1:
                idx += 1
        mapping.update({"fc.weight": "fc.weight", "fc.bias": "fc.bias"})
        return mapping


class _SlimBlock(BasicBlock):
    """:class:`kd3.models.cifar.BasicBlock` at its largest width (same modules and names), run at any width."""

    def forward(self, x: torch.Tensor, planes: int) -> torch.Tensor:
        out = F.relu(_bn(self.bn1, _conv(self.conv1, x, planes)))
        out = _bn(self.bn2, _conv(self.conv2, out, planes))
        short = _bn(self.shortcut[1], _conv(self.shortcut[0], x, planes)) if len(self.shortcut) else x
        return F.relu(out + short)


class CifarResNetSupernet(FamilySupernet):
    """Slimmable :class:`kd3.models.cifar.CifarResNet` (3x3 stem, 4 stages, strides 1-2-2-2); one width
    multiplier for every stage keeps the stem as wide as stage 1, so the shortcut layout (identity or
    1x1 conv) is the same in every sub-network, as in the registry model it is extracted to."""

    family = "cifar_resnet"

    def __init__(self, pool: StudentPool, num_classes: int, in_channels: int):
        super().__init__()
        self.pool = pool
        widths, depth = pool.resnet_widths, max(pool.depths)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for s, (w, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
            blocks = []
            for b in range(depth):
                blocks.append(_SlimBlock(in_planes, w, stride if b == 0 else 1))
                in_planes = w
            setattr(self, f"layer{s + 1}", nn.ModuleList(blocks))
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor, cfg: SubnetConfig) -> torch.Tensor:
        widths = scaled(self.pool.resnet_widths, cfg.width)
        x = F.relu(_bn(self.bn1, _conv(self.conv1, x, widths[0])))
        for s, w in enumerate(widths):
            for block in list(getattr(self, f"layer{s + 1}"))[:cfg.depth]:
                x = block(x, w)
        return _linear(self.linear, x.mean(dim=(2, 3)))

    def key_map(self, cfg: SubnetConfig) -> dict[str, str]:
        # module names mirror CifarResNet's; depth keeps the first blocks of each stage
        keys = [k for k in self.state_dict() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        kept = [k for k in keys if not k.startswith("layer") or int(k.split(".")[1]) < cfg.depth]
        return {k: k for k in kept}


SUPERNETS = {"small_cnn": SmallCNNSupernet, "cifar_resnet": CifarResNetSupernet}


class StudentSupernet(nn.Module):
    """One weight-sharing supernet per family of the pool."""

    def __init__(self, pool: StudentPool, num_classes: int, in_channels: int):
        super().__init__()
        self.pool = pool
        self.families = nn.ModuleDict({f: SUPERNETS[f](pool, num_classes, in_channels) for f in pool.families})

    def forward(self, x: torch.Tensor, cfg: SubnetConfig) -> torch.Tensor:
        return self.families[cfg.family](x, cfg)

    def extract_state(self, cfg: SubnetConfig, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.families[cfg.family].extract_state(cfg, target)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Running statistics of every BatchNorm from scratch: one pass in train mode with a cumulative
    average (momentum None). Returns the images seen; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for x in batches:
        model(x)
        seen += len(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return seen


# ----------------------------------------------------------------------------------------- losses
def soft_kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""KL(softmax(a/τ) ‖ softmax(b/τ))·τ², batch mean, with gradients to both sides (the callers detach)."""
    log_p = F.log_softmax(target_logits / temperature, dim=1)
    log_q = F.log_softmax(logits / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean() * temperature**2


@dataclass
class GTNLoss:
    """The joint objective of one step (docs/methods.md, "Generic teacher"):

    L_T     = CE(z_T, y) + λ_compat · (1/n) Σ_j KL(p_T^τ ‖ sg(p_Sj^τ))·τ²
    L_super = Σ_j [KL(sg(p_T^τ) ‖ p_Sj^τ)·τ² + λ_ce · CE(z_Sj, y)]
    total   = L_T + L_super   (the stop-gradients keep the two parts' gradients apart)
    """

    total: torch.Tensor
    teacher_ce: torch.Tensor
    compat: torch.Tensor
    super_kd: torch.Tensor
    super_ce: torch.Tensor


def gtn_loss(teacher_logits: torch.Tensor, student_logits: Sequence[torch.Tensor], labels: torch.Tensor,
             temperature: float, compat_weight: float, student_ce_weight: float) -> GTNLoss:
    if not student_logits:
        raise ValueError("gtn_loss needs at least one sub-network's logits")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher_ce = F.cross_entropy(teacher_logits, labels)
    compat = torch.stack([soft_kl(teacher_logits, z.detach(), temperature) for z in student_logits]).mean()
    super_kd = torch.stack([soft_kl(teacher_logits.detach(), z, temperature) for z in student_logits]).sum()
    super_ce = torch.stack([F.cross_entropy(z, labels) for z in student_logits]).sum()
    total = teacher_ce + compat_weight * compat + super_kd + student_ce_weight * super_ce
    return GTNLoss(total, teacher_ce, compat, super_kd, super_ce)


# ------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class GTNSettings:
    epochs: int
    batch_size: int
    teacher_lr: float
    supernet_lr: float
    momentum: float
    weight_decay: float
    temperature: float
    compat_weight: float
    student_ce_weight: float
    random_subnets: int
    seed: int
    warmup_epochs: int = 0


def prepare_generic_teacher(teacher: nn.Module, supernet: StudentSupernet, images: torch.Tensor,
                            labels: torch.Tensor, settings: GTNSettings,
                            transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                            on_epoch: Callable[[dict], None] = lambda record: None,
                            batches: Callable[[Iterable], Iterable] = lambda it: it) -> list[dict]:
    """Optimise the teacher (task loss + compatibility) and the supernet (KD from the teacher) jointly.

    ``images``: float [N, C, H, W] on the training device in [0, 1]; ``transform(batch, generator)``
    augments and normalises a batch. One SGD optimiser with a parameter group each (teacher_lr,
    supernet_lr), cosine per epoch; during the first ``warmup_epochs`` the teacher is frozen (eval mode,
    lr 0, no compatibility term) so it is never pulled toward untrained sub-students. Per step: a fresh sandwich of sub-networks, one backward of
    :func:`gtn_loss`. Returns one record per epoch (mean loss terms, teacher train accuracy).
    """
    s = settings
    groups = [{"params": [p for p in supernet.parameters()], "lr": s.supernet_lr}]
    if s.teacher_lr > 0:
        groups.insert(0, {"params": [p for p in teacher.parameters() if p.requires_grad], "lr": s.teacher_lr})
    else:
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.SGD(groups, lr=s.supernet_lr, momentum=s.momentum, weight_decay=s.weight_decay)
    cosine = lambda e: 0.5 * (1 + math.cos(math.pi * e / s.epochs))  # noqa: E731
    frozen_first = lambda e: cosine(e) if e >= s.warmup_epochs else 0.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [frozen_first, cosine][-len(groups):])
    gen = torch.Generator().manual_seed(s.seed)
    rng = random.Random(s.seed)
    records = []
    n = len(labels)
    for epoch in range(s.epochs):
        # warm-up: the supernet learns from the frozen teacher first (the teacher's group has lr 0)
        teaching = s.teacher_lr > 0 and epoch >= s.warmup_epochs
        teacher.train(teaching)
        supernet.train()
        sums = {"loss": 0.0, "teacher_ce": 0.0, "compat": 0.0, "super_kd": 0.0, "super_ce": 0.0}
        correct, seen = 0, 0
        order = torch.randperm(n, generator=gen)
        # drop a last batch of one: batch-statistics BN needs two samples
        starts = [b for b in range(0, n, s.batch_size) if n - b > 1]
        for start in batches(starts):
            idx = order[start:start + s.batch_size]
            x = transform(images[idx.to(images.device)], gen)
            y = labels[idx.to(labels.device)]
            with torch.set_grad_enabled(teaching):
                z_t = teacher(x)
            subnets = supernet.pool.sandwich(s.random_subnets, rng)
            out = gtn_loss(z_t, [supernet(x, cfg) for cfg in subnets], y, s.temperature,
                           s.compat_weight if teaching else 0.0, s.student_ce_weight)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
            for key in sums:
                sums[key] += float(getattr(out, "total" if key == "loss" else key).detach()) * len(idx)
            correct += int((z_t.argmax(1) == y).sum())
            seen += len(idx)
        scheduler.step()
        record = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()},
                  "teacher_train_acc": correct / max(seen, 1), "teacher_updated": teaching}
        records.append(record)
        on_epoch(record)
    teacher.eval()
    supernet.eval()
    return records
