"""Pool hygiene: exact and near-duplicate removal, and decontamination against evaluation sets.

Pure functions (numpy / torch / faiss, no I/O); the ``dedup`` stage feeds them the pool's decoded
pixels, the score cache's teacher features and the evaluation sets (METHODS.md, docs/dedup.md).

Signals, cheapest first:

- **exact**: SHA-256 of the decoded pixels (shape + bytes). Identical downloads — the same image
  behind many URLs — collapse to one representative before anything else runs, so a pool of a
  million copies of one image costs one vector in the similarity search.
- **perceptual**: the image resized to a small RGB thumbnail (antialiased), each channel minus its
  mean, divided by the norm: a descriptor whose cosine is blind to brightness and contrast changes
  and barely moved by resizing and re-encoding; translated views of the query (steps of a quarter
  thumbnail pixel) let a copy shifted by a pixel or two match its original.
- **teacher**: cosine of the teacher's pooled features (the score cache's ``feature`` column).
- **verification**: each perceptual candidate pair brought to one resolution and aligned over small
  integer translations, scored by the correlation of the overlap, each channel centred
  (:func:`aligned_similarity`): a shifted copy aligned differs only at the border, two look-alike
  digits aligned still differ by their strokes. Cheap retrieval at a loose threshold, then this.

A pair is *similar* when every enabled threshold holds (exact faiss range searches, then verification). Removal is greedy in pool order
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

from kd3.data.images import match_channels, resize_square

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


#: the perceptual thumbnail is built at this multiple of its size, so translations step by a fraction of its pixels
WORK_FACTOR = 4


def perceptual_descriptors(images: Sequence[np.ndarray | torch.Tensor], size: int, max_shift: int = 0) -> np.ndarray:
    """Decoded uint8 images [C, H, W] (any sizes, 1 or 3 channels) → float32 [N, S, 3·size²], C-contiguous.

    Each image is taken in RGB (grey repeated) and resized to WORK_FACTOR·size with antialiasing;
    view s is that image translated by (dy, dx) ∈ [-max_shift, max_shift]² of its pixels (edges
    replicated; view 0 is the untranslated one), averaged down to size×size, each channel centred,
    scaled to unit norm. Centring makes the cosine blind to brightness offsets, the norm to
    contrast; a constant image gives zero rows (similar to nothing). The translated views let a
    copy shifted by a pixel match its original: S = (2·max_shift + 1)² views, in steps of
    1/WORK_FACTOR of a thumbnail pixel."""
    work = WORK_FACTOR * size
    offsets = [(0, 0)] + [(dy, dx) for dy in range(-max_shift, max_shift + 1)
                          for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]
    out = np.zeros((len(images), len(offsets), 3 * size * size), np.float32)
    if not len(images):
        return out
    resized = []
    for image in images:
        x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
        x = match_channels(x, 3).float()
        resized.append(resize_square(x, work))
    batch = torch.stack(resized).double()  # [N, 3, work, work]
    m = max_shift
    padded = torch.nn.functional.pad(batch, (m, m, m, m), mode="replicate") if m else batch
    for k, (dy, dx) in enumerate(offsets):
        view = torch.nn.functional.avg_pool2d(padded[..., m + dy:m + dy + work, m + dx:m + dx + work], WORK_FACTOR)
        v = (view - view.mean((2, 3), keepdim=True)).flatten(1)
        norm = v.norm(dim=1, keepdim=True)
        out[:, k] = torch.where(norm > 1e-6, v / norm.clamp_min(1e-12), torch.zeros_like(v)).float().numpy()
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


def pair_cosine(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine of unit rows a[i[k]] and b[j[k]] for every k."""
    if len(i) == 0:
        return np.zeros(0, np.float32)
    return np.einsum("kd,kd->k", a[i], b[j]).astype(np.float32)


Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def no_pairs() -> Pairs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def concat_pairs(parts: Sequence[Pairs]) -> Pairs:
    return tuple(np.concatenate([p[k] for p in parts]) if parts else no_pairs()[k] for k in range(3))  # type: ignore[return-value]


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


def representatives(digests: Sequence[str]) -> np.ndarray:
    """For each row, the first row (in order) with the same digest."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(d, r) for r, d in enumerate(digests)], dtype=np.int64)


def plan_removal(pool_digests: Sequence[str], eval_digests: Sequence[str], pool_pairs: Pairs = None,
                 eval_pairs: Pairs = None) -> Removal:
    """Which pool rows to drop, why, and the row or evaluation item each one matches.

    ``pool_pairs`` (row i, row j, similarity) are the similar pool pairs (either order; pairs with
    an exact duplicate stand for its representative), ``eval_pairs`` (pool row, evaluation item,
    similarity) the pool rows similar to an evaluation image; both come from :func:`similar_pairs`
    with the thresholds applied. The rule, in pool order:

    1. rows with the same pixel digest form one group; its first row is the representative, the
       later ones are ``exact_duplicate`` of it (similarity 1);
    2. a representative whose digest equals an evaluation image's, or that is in an evaluation
       pair, is ``eval_contamination`` (nearest: the most similar evaluation item — an identical one
       first, then the lowest index on ties), and so is every row of its group;
    3. each remaining representative similar to one kept before it is ``near_duplicate`` of the
       most similar such one (the earliest on ties); the others are kept.
    """
    n = len(pool_digests)
    rep = representatives(pool_digests)
    reason: list[Optional[str]] = [None] * n
    nearest = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    for r in np.flatnonzero(rep != np.arange(n)).tolist():
        reason[r], nearest[r], similarity[r] = EXACT, rep[r], 1.0
    contaminated: dict[int, tuple[int, float]] = {}  # representative row → (evaluation item, similarity)
    eval_first: dict[str, int] = {}
    for e, d in enumerate(eval_digests):
        eval_first.setdefault(d, e)
    for r in np.unique(rep).tolist():
        if pool_digests[r] in eval_first:
            contaminated[r] = (eval_first[pool_digests[r]], 2.0)  # above any cosine: identical wins
    i, j, sim = eval_pairs if eval_pairs is not None else no_pairs()
    for k in np.lexsort((j, -sim)).tolist():  # best first, lowest index on ties
        contaminated.setdefault(int(rep[i[k]]), (int(j[k]), float(sim[k])))
    for r, (e, s) in contaminated.items():
        reason[r], nearest[r], similarity[r] = CONTAMINATION, e, min(s, 1.0)
    for r in range(n):  # every copy of a contaminated image leaves with it
        if reason[r] == EXACT and rep[r] in contaminated:
            reason[r], nearest[r], similarity[r] = CONTAMINATION, nearest[rep[r]], similarity[rep[r]]
    i, j, sim = pool_pairs if pool_pairs is not None else no_pairs()
    i, j = rep[i], rep[j]
    later, earlier = np.maximum(i, j), np.minimum(i, j)
    usable = (later != earlier) & ~np.isin(later, list(contaminated)) & ~np.isin(earlier, list(contaminated))
    later, earlier, sim = later[usable], earlier[usable], sim[usable]
    order = np.lexsort((earlier, -sim, later))  # per later row: best first, the earliest on ties
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for a, b, s in zip(later[order].tolist(), earlier[order].tolist(), sim[order].tolist()):
        neighbours.setdefault(a, []).append((b, s))
    kept = np.ones(n, dtype=bool)
    for a in sorted(neighbours):
        match = next(((b, s) for b, s in neighbours[a] if kept[b]), None)
        if match is not None:
            kept[a] = False
            reason[a], nearest[a], similarity[a] = NEAR, match[0], match[1]
    return Removal(reason, nearest, similarity)


def verification_images(images: Sequence[np.ndarray | torch.Tensor], size: int) -> torch.Tensor:
    """Decoded uint8 images [C, H, W] (any sizes, 1 or 3 channels) → float32 [N, 3, size, size]: each
    in RGB (grey repeated), resized to size×size with antialiasing — the common resolution at which
    candidate pairs are aligned and compared (a resized copy is brought back to its original's size)."""
    out = torch.zeros((len(images), 3, size, size), dtype=torch.float32)
    for k, image in enumerate(images):
        x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
        x = match_channels(x, 3).float()
        out[k] = resize_square(x, size)
    return out


def shifts(max_shift: int) -> list[tuple[int, int]]:
    """The translations (dy, dx) ∈ [-max_shift, max_shift]², (0, 0) first."""
    return [(0, 0)] + [(dy, dx) for dy in range(-max_shift, max_shift + 1)
                       for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]


def _window_sums(x: torch.Tensor, offsets: Sequence[tuple[int, int]], moving: bool) -> torch.Tensor:
    """Sums of x [N, C, H, W] over the overlap window of each translation (dy, dx) — the fixed
    image's window (``moving`` False) or the translated one's (True) — from one integral image
    → [N, C, S] float64."""
    _, _, h, w = x.shape
    integral = torch.nn.functional.pad(x.double().cumsum(2).cumsum(3), (1, 0, 1, 0))
    sums = []
    for dy, dx in offsets:
        if moving:
            y0, y1, x0, x1 = max(0, dy), h + min(0, dy), max(0, dx), w + min(0, dx)
        else:
            y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
        sums.append(integral[..., y1, x1] - integral[..., y0, x1] - integral[..., y1, x0] + integral[..., y0, x0])
    return torch.stack(sums, -1)


def aligned_similarity(a: torch.Tensor, b: torch.Tensor, i: np.ndarray, j: np.ndarray, max_shift: int,
                       chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The aligned correlation of each candidate pair (a[i[k]], b[j[k]]): images float [Na, C, H, W]
    and [Nb, C, H, W] of one size (:func:`verification_images`) → (score float32 [K], best
    translation int64 [K, 2] as (dy, dx)).

    For every translation (dy, dx) ∈ [-max_shift, max_shift]² of b against a (b's pixel (y + dy,
    x + dx) over a's pixel (y, x)), the two images are cut to their overlap, each channel of each
    cut minus its own mean, and compared by correlation (dot product over both norms): blind to a
    brightness offset and a contrast change, and unmoved by what a translation pushes in at the
    border. The score is the best translation's correlation (the earliest of :func:`shifts` on
    ties); an overlap that is constant in either image scores 0. Per pair only the dot products
    are computed (one grouped convolution of b, zero-padded, with a, for every translation at
    once); the overlap sums are per image, from integral images."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    offsets = shifts(max_shift)
    if len(i) == 0:
        return np.zeros(0, np.float32), np.zeros((0, 2), np.int64)
    _, c, h, w = a.shape
    m = max_shift
    # centred per image and channel first, so that the moments below cancel little in float32
    a = (a - a.mean((2, 3), keepdim=True)).float()
    b = (b - b.mean((2, 3), keepdim=True)).float()
    sa, saa = _window_sums(a, offsets, False), _window_sums(a * a, offsets, False)  # [Na, C, S]
    sb, sbb = _window_sums(b, offsets, True), _window_sums(b * b, offsets, True)
    n = torch.tensor([(h - abs(dy)) * (w - abs(dx)) for dy, dx in offsets], dtype=torch.float64)
    var_a, var_b = (saa - sa * sa / n).sum(1), (sbb - sb * sb / n).sum(1)  # [N, S]
    padded = torch.nn.functional.pad(b, (m, m, m, m))
    flat = [(m + dy) * (2 * m + 1) + (m + dx) for dy, dx in offsets]
    scores = np.zeros(len(i), np.float32)
    where = np.zeros((len(i), 2), np.int64)
    for start in range(0, len(i), chunk):
        ii, jj = torch.from_numpy(i[start:start + chunk]), torch.from_numpy(j[start:start + chunk])
        k = len(ii)
        # cross[k, c, m + dy, m + dx] = Σ a(y, x)·b(y + dy, x + dx) over the overlap (b is 0 outside it)
        cross = torch.nn.functional.conv2d(padded[jj].reshape(1, k * c, h + 2 * m, w + 2 * m),
                                           a[ii].reshape(k * c, 1, h, w), groups=k * c)
        sab = cross.reshape(k, c, -1)[..., flat].double()  # [k, C, S]
        cov = (sab - sa[ii] * sb[jj] / n).sum(1)
        var = (var_a[ii] * var_b[jj]).clamp_min(0)
        score = torch.where(var > 1e-12 * n * n, cov / var.sqrt().clamp_min(1e-300), torch.zeros_like(cov))
        best = score.argmax(1)  # the first maximum: the earliest translation on ties
        scores[start:start + k] = score.gather(1, best[:, None])[:, 0].clamp(-1, 1).float().numpy()
        where[start:start + k] = np.asarray(offsets, np.int64)[best.numpy()]
    return scores, where
