"""Pool hygiene: exact and near-duplicate removal, and decontamination against evaluation sets.

Pure functions (numpy / torch / faiss, no I/O); the ``dedup`` stage feeds them the pool's decoded
pixels, the score cache's teacher features and the evaluation sets (METHODS.md, docs/dedup.md).

Signals, cheapest first:

- **exact**: SHA-256 of the decoded pixels (shape + bytes). Identical downloads — the same image
  behind many URLs — collapse to one representative before anything else runs, so a pool of a
  million copies of one image costs one vector in the similarity search.
- **perceptual**: the grey image resized to ``size``×``size`` (antialiased), minus its mean, divided
  by its norm: a descriptor whose cosine (= Pearson correlation of the thumbnails) is unchanged by
  brightness and contrast changes and barely moved by resizing and re-encoding.
- **teacher**: cosine of the teacher's pooled features (the score cache's ``feature`` column).

A pair is *similar* when every enabled threshold holds. Removal is greedy in pool order
(score-cache row order = (shard, key) order = URL-list order): a sample is kept unless it is
similar to a sample kept before it, so every removed sample names a kept one within the
threshold (no chains), and the result does not depend on thread counts or faiss internals.
Evaluation contamination is decided first: a pool sample similar to any evaluation image goes,
whatever else it duplicates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from kd3.data.images import match_channels

EXACT = "exact_duplicate"
NEAR = "near_duplicate"
CONTAMINATION = "eval_contamination"
REASONS = (EXACT, NEAR, CONTAMINATION)


def pixel_digest(image: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (hex) of a decoded uint8 image [C, H, W]: its shape, then its bytes."""
    array = np.ascontiguousarray(image.numpy() if isinstance(image, torch.Tensor) else image, dtype=np.uint8)
    digest = hashlib.sha256("x".join(map(str, array.shape)).encode() + b"\0")
    digest.update(array.tobytes())
    return digest.hexdigest()


def perceptual_descriptors(images: Sequence[np.ndarray | torch.Tensor], size: int, max_shift: int = 0) -> np.ndarray:
    """Decoded uint8 images [C, H, W] (any sizes, 1 or 3 channels) → float32 [N, S, size²], C-contiguous.

    Each image is turned grey (ITU-R 601 luma) and resized to 2·size with antialiasing; view s is
    that image translated by (dy, dx) ∈ [-max_shift, max_shift]² pixels (edges replicated; view 0
    is the untranslated one), then halved to size×size, centred and scaled to unit norm. A constant
    image gives zero rows (similar to nothing). Translated views let a copy shifted by a pixel or
    two match its original: S = (2·max_shift + 1)² views."""
    work = 2 * size
    offsets = [(0, 0)] + [(dy, dx) for dy in range(-max_shift, max_shift + 1)
                          for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]
    out = np.zeros((len(images), len(offsets), size * size), np.float32)
    if not len(images):
        return out
    greys = []
    for image in images:
        x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
        grey = match_channels(x, 1).float()
        if tuple(grey.shape[-2:]) != (work, work):
            grey = TF.resize(grey, [work, work], antialias=True)
        greys.append(grey)
    batch = torch.stack(greys).double()  # [N, 1, 2s, 2s]
    m = max_shift
    padded = torch.nn.functional.pad(batch, (m, m, m, m), mode="replicate") if m else batch
    for k, (dy, dx) in enumerate(offsets):
        view = padded[..., m + dy:m + dy + work, m + dx:m + dx + work]
        v = torch.nn.functional.avg_pool2d(view, 2).flatten(1)
        v = v - v.mean(1, keepdim=True)
        norm = v.norm(dim=1, keepdim=True)
        v = torch.where(norm > 1e-6 * size, v / norm.clamp_min(1e-12), torch.zeros_like(v))
        out[:, k] = v.float().numpy()
    return out


def unit_rows(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32 C-contiguous (what faiss needs)."""
    x = np.array(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    x[(norms == 0)[:, 0]] = 0
    return x


def similar_pairs(queries: np.ndarray, database: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query i, database j, cosine) with cosine ≥ ``threshold`` between unit rows, by an exact
    faiss range search (IndexFlatIP). ``queries`` [N, d], or [N, S, d] for S views per query (the
    pair's cosine is then the best view's). Returns three aligned arrays, sorted by (i, j)."""
    import faiss

    views = queries if queries.ndim == 3 else queries[:, None]
    if len(views) == 0 or len(database) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    found = []
    for v in range(views.shape[1]):
        # faiss keeps similarities strictly above the radius; the slack keeps ties and float32 rounding of 1.0
        lims, sims, ids = index.range_search(np.ascontiguousarray(views[:, v], dtype=np.float32),
                                             float(threshold) - 1e-6)
        rows = np.repeat(np.arange(len(views), dtype=np.int64), np.diff(lims).astype(np.int64))
        found.append((rows, ids.astype(np.int64), sims.astype(np.float32)))
    rows, ids, sims = (np.concatenate(parts) for parts in zip(*found))
    order = np.lexsort((-sims, ids, rows))  # by (i, j), best view first
    rows, ids, sims = rows[order], ids[order], sims[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])
    return rows[first], ids[first], sims[first]


def _base_view(x: np.ndarray) -> np.ndarray:
    """The untranslated view [N, d] of perceptual descriptors [N, S, d] (2-D arrays as they are)."""
    return np.ascontiguousarray(x[:, 0]) if x.ndim == 3 else x


def pair_cosine(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine of unit rows a[i[k]] and b[j[k]] for every k."""
    if len(i) == 0:
        return np.zeros(0, np.float32)
    return np.einsum("kd,kd->k", a[i], b[j]).astype(np.float32)


@dataclass
class Signals:
    """What the pool (or an evaluation set) looks like to the similarity rule: one entry per image."""

    digests: list[str]
    #: unit perceptual descriptors [N, S, s²] (S translated views; None: that signal is off)
    perceptual: Optional[np.ndarray] = None
    #: unit teacher features [N, D] (None: that signal is off)
    features: Optional[np.ndarray] = None

    def take(self, rows: np.ndarray) -> "Signals":
        return Signals([self.digests[r] for r in rows],
                       None if self.perceptual is None else self.perceptual[rows],
                       None if self.features is None else self.features[rows])


@dataclass
class Thresholds:
    #: perceptual-descriptor cosine at or above which two images may be copies (None: not used)
    perceptual: Optional[float]
    #: teacher-feature cosine at or above which two images may be copies (None: not used)
    feature: Optional[float]

    @property
    def any(self) -> bool:
        return self.perceptual is not None or self.feature is not None


def matches(a: Signals, b: Signals, t: Thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i in a, j in b, similarity) that pass every enabled threshold; the similarity reported
    is the perceptual cosine when that signal is on, else the feature cosine. The first enabled
    signal finds candidates by range search, the second filters them."""
    spaces = [(x, y, thr) for x, y, thr in ((a.perceptual, b.perceptual, t.perceptual),
                                           (a.features, b.features, t.feature)) if thr is not None]
    if not spaces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    (x, y, thr), rest = spaces[0], spaces[1:]
    i, j, sim = similar_pairs(x, _base_view(y), thr)
    for x2, y2, thr2 in rest:
        keep = pair_cosine(_base_view(x2), _base_view(y2), i, j) >= thr2 - 1e-6
        i, j, sim = i[keep], j[keep], sim[keep]
    return i, j, sim


@dataclass
class Removal:
    """The verdict on the pool, by pool row: ``reason[r]`` is None for a kept row."""

    reason: list[Optional[str]]
    #: for a removed row: the pool row it duplicates, or the evaluation item index it matches
    nearest: np.ndarray  # int64 [N], -1 for kept rows
    similarity: np.ndarray  # float32 [N], NaN for kept rows

    @property
    def kept(self) -> np.ndarray:
        return np.array([r is None for r in self.reason], dtype=bool)


def plan_removal(pool: Signals, evaluation: Optional[Signals], t: Thresholds) -> Removal:
    """Which pool rows to drop, why, and the row or evaluation item each one matches.

    1. rows with the same pixel digest form one group; its first row (pool order) is the
       representative, the later ones are ``exact_duplicate`` of it (similarity 1);
    2. a representative whose digest equals an evaluation image's, or that is similar to one
       (``t``), is ``eval_contamination`` (nearest: the most similar evaluation item, lowest index
       on ties), and so is every row of its group;
    3. the remaining representatives, in pool order: one similar to a representative kept before
       it is ``near_duplicate`` of the most similar such one (earliest on ties); else it is kept.
    """
    n = len(pool.digests)
    reason: list[Optional[str]] = [None] * n
    nearest = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    first: dict[str, int] = {}
    for r, d in enumerate(pool.digests):
        if d in first:
            reason[r], nearest[r], similarity[r] = EXACT, first[d], 1.0
        else:
            first[d] = r
    reps = np.array(sorted(first.values()), dtype=np.int64)
    rep_signals = pool.take(reps)
    contaminated: dict[int, tuple[int, float]] = {}  # index into reps → (eval item, similarity)
    if evaluation is not None and len(evaluation.digests):
        eval_first: dict[str, int] = {}
        for e, d in enumerate(evaluation.digests):
            eval_first.setdefault(d, e)
        for k, d in enumerate(rep_signals.digests):
            if d in eval_first:
                contaminated[k] = (eval_first[d], 1.0)
        if t.any:
            i, j, sim = matches(rep_signals, evaluation, t)
            for k, e, s in zip(i.tolist(), j.tolist(), sim.tolist()):
                best = contaminated.get(k)  # pairs come by ascending e: ties keep the lowest index
                if best is None or s > best[1] + 1e-7:
                    contaminated[k] = (e, s)
    for k, (e, s) in contaminated.items():
        r = int(reps[k])
        reason[r], nearest[r], similarity[r] = CONTAMINATION, e, s
    for r in range(n):  # every copy of a contaminated image leaves with it
        if reason[r] == EXACT and reason[nearest[r]] == CONTAMINATION:
            reason[r], similarity[r] = CONTAMINATION, similarity[nearest[r]]
            nearest[r] = nearest[nearest[r]]
    if t.any:
        candidates = np.array([k for k in range(len(reps)) if k not in contaminated], dtype=np.int64)
        sub = rep_signals.take(candidates)
        i, j, sim = matches(sub, sub, t)
        # each pair as (later, earlier) in pool order: only the later one can go; a pair found from
        # both ends (translated views of either image) counts at its best similarity
        later, earlier = np.maximum(i, j), np.minimum(i, j)
        distinct = later != earlier
        later, earlier, sim = later[distinct], earlier[distinct], sim[distinct]
        order = np.lexsort((-sim, earlier, later))
        neighbours: dict[int, list[tuple[int, float]]] = {}
        for a, b, s in zip(later[order].tolist(), earlier[order].tolist(), sim[order].tolist()):
            neighbours.setdefault(a, []).append((b, s))
        kept = np.ones(len(candidates), dtype=bool)
        for a in range(len(candidates)):
            best: Optional[tuple[int, float]] = None
            for b, s in neighbours.get(a, ()):
                if kept[b] and (best is None or s > best[1] + 1e-7):
                    best = (b, s)
            if best is not None:
                kept[a] = False
                r = int(reps[candidates[a]])
                reason[r], nearest[r], similarity[r] = NEAR, int(reps[candidates[best[0]]]), best[1]
    return Removal(reason, nearest, similarity)
