"""Weight averaging of the student for KD under domain shift (METHODS.md §2).

- WAKD: uniform average of the student's weights from 10 % of training onward, every step (or
  every k steps); needs no validation data.
- SMA: the same from a configurable start step t0.
- SWAD (Cha et al. 2021): dense averaging over a window found on a validation-loss curve by the
  LossValley rule (:func:`swad_window`); the SWAD model merges the per-segment averages in the
  window (:func:`merge_segment_averages`).

BatchNorm statistics are averaged like any other floating buffer (as the reference does); integer
buffers (BN ``num_batches_tracked``) take the latest value. Pure torch: no I/O, no logging.

Own code rather than ``torch.optim.swa_utils.AveragedModel``: that keeps a deep copy of the whole
module per average and accumulates in the parameters' dtype, while kd3 needs float32 accumulation
for low-precision students, SWAD's per-segment averages merged over a window chosen afterwards, and
averages saved as plain state dicts in the trainer checkpoint for exact resume. (BN recompute is
``swa_utils.update_bn``'s rule, kept in kd3.stages.average because update_bn would also reset the
frozen teacher head's statistics of a KD³ student.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

AVERAGING_MODES = ("wakd", "sma")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulate half/bfloat16/float32 in float32 and float64 in float64: low-precision running
    # means drift badly after many updates.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _state_of(model: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise ValueError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


class WeightAverager:
    """Running uniform average of a model's state (parameters and buffers).

    After n calls to :meth:`update`, each floating entry holds (1/n)·Σ_i θ_i, computed
    incrementally as avg += (θ_n − avg)/n in float32 (float64 for float64 entries) on the entry's
    device, without autograd. Integer/bool entries hold the latest value.
    """

    def __init__(self) -> None:
        self.n_averaged: int = 0
        self._avg: dict[str, torch.Tensor] = {}
        # 0-element tensors remembering each entry's original dtype, so the averaged state dict
        # loads into the model unchanged and checkpoints stay "tensors + ints" (weights_only safe).
        self._dtype: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Add the model's current state (an ``nn.Module`` or its state dict) to the average."""
        state = _state_of(model)
        if self.n_averaged and set(state) != set(self._avg):
            raise ValueError(f"state keys changed since the first update: missing "
                             f"{sorted(set(self._avg) - set(state))}, new {sorted(set(state) - set(self._avg))}")
        n = self.n_averaged + 1
        for key, value in state.items():
            value = value.detach()
            if not value.is_floating_point():
                self._avg[key] = value.clone()
            elif n == 1:
                self._avg[key] = value.to(_acc_dtype(value.dtype), copy=True)
            else:
                avg = self._avg[key]
                avg += (value.to(avg.device, avg.dtype) - avg) / n
            if n == 1:
                self._dtype[key] = torch.empty(0, dtype=value.dtype)
        self.n_averaged = n

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The average as a model state dict (original dtypes), loadable with ``load_state_dict``."""
        if self.n_averaged == 0:
            raise ValueError("WeightAverager has no update yet: nothing to average")
        return {k: v.to(self._dtype[k].dtype, copy=True) for k, v in self._avg.items()}

    def state_dict(self) -> dict:
        """Checkpoint of the averager (plain tensors and ints; loads with weights_only=True)."""
        return {"n_averaged": self.n_averaged,
                "average": {k: v.clone() for k, v in self._avg.items()},
                "dtypes": {k: v.clone() for k, v in self._dtype.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`; continuing updates then matches an uninterrupted run exactly."""
        try:
            n, avg, dtypes = state["n_averaged"], state["average"], state["dtypes"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a WeightAverager state dict (missing {e})") from None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n_averaged must be a non-negative int, got {n!r}")
        if set(avg) != set(dtypes) or (n > 0) != bool(avg):
            raise ValueError("inconsistent WeightAverager state dict: 'average' and 'dtypes' disagree")
        self.n_averaged = n
        self._avg = {k: v.detach().clone() for k, v in avg.items()}
        self._dtype = {k: v.detach().clone() for k, v in dtypes.items()}

    @torch.no_grad()
    def merge(self, other: WeightAverager) -> None:
        """Count-weighted merge: avg = (n·avg + m·avg_other)/(n + m); integer entries take ``other``'s.

        ``other`` is taken as the later run (e.g. the next segment).
        """
        if other.n_averaged == 0:
            return
        if self.n_averaged == 0:
            self.load_state_dict(other.state_dict())
            return
        if set(other._avg) != set(self._avg):
            raise ValueError("cannot merge averagers of different models (state keys differ)")
        n, m = self.n_averaged, other.n_averaged
        for key, avg in self._avg.items():
            theirs = other._avg[key]
            if avg.is_floating_point():
                avg += (theirs.to(avg.device, avg.dtype) - avg) * (m / (n + m))
            else:
                self._avg[key] = theirs.clone()
        self.n_averaged = n + m


def should_update(step: int, total_steps: int, mode: str, start_fraction: float = 0.1,
                  start_step: int = 0, every: int = 1) -> bool:
    """Whether the average takes the weights after (0-based) optimisation step ``step``.

    ``"wakd"`` starts at t0 = floor(start_fraction·total_steps) (METHODS.md §2: 10 % of training),
    ``"sma"`` at t0 = start_step; both then update at t0, t0 + every, t0 + 2·every, …
    The floor forgives float representation error (0.29·100 → 29, not 28).
    """
    if mode not in AVERAGING_MODES:
        raise ValueError(f"unknown averaging mode {mode!r}; valid choices: {', '.join(AVERAGING_MODES)}")
    for name, value, low in (("step", step, 0), ("total_steps", total_steps, 0),
                             ("start_step", start_step, 0), ("every", every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if mode == "wakd":
        if not (isinstance(start_fraction, (int, float)) and 0.0 <= start_fraction <= 1.0):
            raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction!r}")
        t0 = math.floor(start_fraction * total_steps + 1e-9)
    else:
        t0 = start_step
    return step >= t0 and (step - t0) % every == 0


def swad_window(val_losses: Sequence[float], n_converge: int = 3, n_tolerance: int = 6,
                tolerance_ratio: float = 0.3) -> tuple[int, int] | None:
    """SWAD's LossValley (Cha et al. 2021): the averaging window over evaluation points.

    ``val_losses[i]`` is the validation loss at the end of segment i. Rule (indices inclusive):

    1. Start s = the first index whose converge queue losses[s : s+n_converge] is complete and has
       its minimum at s (ties count, like ``np.argmin``). None if no such s exists.
    2. threshold = mean(losses[s : s+n_converge])·(1 + tolerance_ratio).
    3. The valley dies at the first j ≥ j0 with min(losses[j : j+n_tolerance]) > threshold (a full
       tolerance window, or what remains at the end of the curve); then end = j − 1. If it never
       dies, end = the last index. j0 = s + 1 normally; when n_tolerance < n_converge the reference
       adds segments s+1 … s+n_converge−n_tolerance unconditionally at convergence, so
       j0 = s + n_converge − n_tolerance + 1.

    Deviation: with n_tolerance > n_converge the reference code also reaches back into segments
    before s (and counts segment s twice); we keep the window starting at s.

    Example, n_converge=3, n_tolerance=3, ratio 0.3, losses
    [1.0, .8, .6, .5, .55, .52, .6, .9, 1.2, ...]: s = 3 ([.5, .55, .52] has its min first),
    threshold = 1.3·1.57/3 ≈ 0.6803; min(.52, .6, .9) and min(.6, .9, 1.2) pass, min(.9, 1.2, …)
    = .9 does not → valley dies at j = 7 → window (3, 6).
    """
    losses = [float(v) for v in val_losses]
    for name, value in (("n_converge", n_converge), ("n_tolerance", n_tolerance)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(tolerance_ratio, (int, float)) and tolerance_ratio >= 0):
        raise ValueError(f"tolerance_ratio must be >= 0, got {tolerance_ratio!r}")
    if any(not math.isfinite(v) for v in losses):
        raise ValueError("val_losses must be finite")
    start = next((s for s in range(len(losses) - n_converge + 1)
                  if losses[s] <= min(losses[s:s + n_converge])), None)
    if start is None:
        return None
    threshold = sum(losses[start:start + n_converge]) / n_converge * (1.0 + tolerance_ratio)
    first_check = start + max(1, n_converge - n_tolerance + 1)
    for j in range(first_check, len(losses)):
        if min(losses[j:j + n_tolerance]) > threshold:
            return start, j - 1
    return start, len(losses) - 1


def merge_segment_averages(segments: Sequence[tuple[Mapping[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Count-weighted mean of per-segment averaged state dicts: Σ_s n_s·θ_s / Σ_s n_s.

    This is the SWAD model when ``segments`` are the windows' (averaged_state_dict, n_averaged)
    pairs. Floating entries are combined in float32/float64 and returned in their original
    dtype; integer entries take the last segment's value.
    """
    if not segments:
        raise ValueError("merge_segment_averages needs at least one segment")
    counts = [c for _, c in segments]
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"segment counts must be non-negative ints with a positive sum, got {counts}")
    keys = set(segments[0][0])
    for i, (state, _) in enumerate(segments):
        if set(state) != keys:
            raise ValueError(f"segment {i} has different state keys than segment 0")
    total = sum(counts)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, ref in segments[-1][0].items():
            if not ref.is_floating_point():
                out[key] = ref.detach().clone()
                continue
            acc = torch.zeros(ref.shape, dtype=_acc_dtype(ref.dtype), device=ref.device)
            for state, count in segments:
                if count:
                    acc += state[key].detach().to(acc.device, acc.dtype) * (count / total)
            out[key] = acc.to(ref.dtype)
    return out
