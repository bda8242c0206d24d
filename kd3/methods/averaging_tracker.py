"""Weight averages kept while the student trains: WAKD, SMA and SWAD's segments (METHODS.md §2).

The train stage calls :meth:`TrainingAverages.after_step` after every optimiser step and, for
SWAD, :meth:`TrainingAverages.close_swad_segment` with a validation loss every ``eval_every``
steps. The whole state is plain tensors, numbers and lists (``weights_only``-loadable), saved in
every epoch checkpoint's trainer state so a resumed run continues the averages exactly;
``kd3 average`` turns it into models with :meth:`TrainingAverages.final_states`. Built on the
pure functions of :mod:`kd3.methods.averaging`. No I/O.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from kd3.methods.averaging import WeightAverager, merge_segment_averages, should_update, swad_window

TRAINING_MODES = ("wakd", "sma", "swad")


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested dicts/lists (e.g. move a state to a device)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _averager(state: Mapping) -> WeightAverager:
    avg = WeightAverager()
    avg.load_state_dict(state)
    return avg


class SwadTracker:
    """SWAD (Cha et al. 2021): dense averaging, a loss-valley window over segment averages.

    Every step enters the current segment's running average; every ``eval_every`` steps the
    segment closes with the validation loss of the *current* weights (as the reference evaluates
    the model at each checkpoint). The SWAD model is ``merge_segment_averages`` over the segments
    ``swad_window(losses, n_converge, n_tolerance, tolerance_ratio)`` selects. Segment k covers
    the global steps [k·eval_every, (k+1)·eval_every).

    Memory stays bounded instead of one model copy per evaluation: a segment is dropped as soon as
    it can no longer enter the window, and merged into one running window average as soon as it is
    known to be inside it. Before the valley's start is found only the last ``n_converge``
    segments are kept; afterwards at most ``n_tolerance`` pending ones. The result equals the
    keep-everything computation (tested). Once the valley has died nothing more is averaged or
    evaluated. Without any valley the last closed segment (or, before the first evaluation, the
    running one) stands in, as the reference returns its last converge-queue entry.
    """

    def __init__(self, eval_every: int, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        for name, value in (("eval_every", eval_every), ("n_converge", n_converge), ("n_tolerance", n_tolerance)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not tolerance_ratio >= 0:
            raise ValueError(f"tolerance_ratio must be >= 0, got {tolerance_ratio!r}")
        self.eval_every, self.n_converge, self.n_tolerance = eval_every, n_converge, n_tolerance
        self.tolerance_ratio = float(tolerance_ratio)
        self.losses: list[float] = []
        self.start: Optional[int] = None
        #: last segment of the window once the valley has died (then nothing more is tracked)
        self.end: Optional[int] = None
        #: segments [start, confirmed) are merged into ``window``
        self.confirmed = 0
        self.window = WeightAverager()
        self.segments: dict[int, WeightAverager] = {}
        self.current = WeightAverager()

    @property
    def dead(self) -> bool:
        return self.end is not None

    @property
    def threshold(self) -> Optional[float]:
        if self.start is None:
            return None
        queue = self.losses[self.start:self.start + self.n_converge]
        return sum(queue) / len(queue) * (1.0 + self.tolerance_ratio)

    def update(self, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
        if not self.dead:
            self.current.update(model)

    def due(self, step: int) -> bool:
        """Whether the segment closes after (0-based, global) step ``step``."""
        return not self.dead and (step + 1) % self.eval_every == 0

    def close_segment(self, val_loss: float) -> None:
        """End the running segment with the validation loss of the weights after its last step."""
        if self.dead:
            return
        i = len(self.losses)
        self.losses.append(float(val_loss))
        self.segments[i] = self.current
        self.current = WeightAverager()
        nc, nt = self.n_converge, self.n_tolerance
        if self.start is None:
            s = i - nc + 1  # the candidate whose converge queue just became complete
            if s >= 0 and self.losses[s] <= min(self.losses[s:]):
                self.start, self.confirmed = s, s
            else:
                # later candidates start at s + 1; the newest segment stays as the no-valley fallback
                for k in [k for k in self.segments if k < s + 1 and k != i]:
                    del self.segments[k]
                return
        first_check = self.start + max(1, nc - nt + 1)  # as swad_window's j0
        inside = first_check - 1  # segments before j0 are in the window whenever one exists
        j = i - nt + 1  # the valley test whose tolerance window just became complete
        if j >= first_check:
            if min(self.losses[j:j + nt]) > self.threshold:
                self.end = inside = j - 1
            else:
                inside = j
        for k in range(self.confirmed, min(inside, i) + 1):
            self.window.merge(self.segments.pop(k))
            self.confirmed = k + 1
        if self.dead:
            self.segments.clear()
            self.current = WeightAverager()

    def final_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The SWAD model's state dict and a description (window, steps, counts, fallback)."""
        info: dict[str, Any] = {"val_losses": list(self.losses), "eval_every": self.eval_every}
        if self.start is None:
            last = max(self.segments) if self.segments else None
            source = self.segments[last] if last is not None else self.current
            if source.n_averaged == 0:
                raise ValueError("SWAD has averaged no step yet")
            first = (last if last is not None else len(self.losses)) * self.eval_every
            info.update(window=None, n_averaged=source.n_averaged,
                        fallback=("no loss valley: the last segment's average" if last is not None
                                  else "no validation evaluation yet: the running segment's average"),
                        segments=None if last is None else [last, last],
                        steps=[first, first + source.n_averaged - 1])
            return source.averaged_state_dict(), info
        window = swad_window(self.losses, self.n_converge, self.n_tolerance, self.tolerance_ratio)
        if window is None or window[0] != self.start or (self.dead and window[1] != self.end):
            raise RuntimeError(f"SWAD bookkeeping disagrees with swad_window: {window} vs start {self.start}, "
                               f"end {self.end}")
        start, end = window
        parts = []
        if self.window.n_averaged:
            parts.append((self.window.averaged_state_dict(), self.window.n_averaged))
        for k in sorted(self.segments):
            if self.confirmed <= k <= end:
                parts.append((self.segments[k].averaged_state_dict(), self.segments[k].n_averaged))
        info.update(window=[start, end], segments=[start, end], n_averaged=sum(n for _, n in parts), fallback=None,
                    steps=[start * self.eval_every, (end + 1) * self.eval_every - 1], valley_died=self.dead)
        return merge_segment_averages(parts), info

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "start": self.start, "end": self.end, "confirmed": self.confirmed,
                "window": self.window.state_dict(), "current": self.current.state_dict(),
                "segments": {int(k): v.state_dict() for k, v in self.segments.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.losses = [float(v) for v in state["losses"]]
        self.start, self.end, self.confirmed = state["start"], state["end"], int(state["confirmed"])
        self.window = _averager(state["window"])
        self.current = _averager(state["current"])
        self.segments = {int(k): _averager(v) for k, v in state["segments"].items()}


class TrainingAverages:
    """The averaged students of one training run (any of ``"wakd"``, ``"sma"``, ``"swad"``).

    WAKD starts with the first step that ends after ``start_fraction`` of the run, measured in
    epochs (KD³'s per-epoch selection changes the steps per epoch, so the total is not known in
    advance); with a constant number of steps per epoch that is ``should_update``'s
    t0 = floor(start_fraction·total_steps). SMA starts at ``sma_start_step``. Both then take the
    weights at t0, t0 + every, … SWAD averages every step (:class:`SwadTracker`).
    """

    def __init__(self, modes: Sequence[str], *, start_fraction: float = 0.1, sma_start_step: int = 0,
                 every: int = 1, swad_eval_every: int = 100, swad_n_converge: int = 3, swad_n_tolerance: int = 6,
                 swad_tolerance_ratio: float = 0.3):
        unknown = [m for m in modes if m not in TRAINING_MODES]
        if unknown:
            raise ValueError(f"unknown averaging mode(s) {unknown}; valid choices: {', '.join(TRAINING_MODES)}")
        self.modes = [m for m in TRAINING_MODES if m in modes]
        self.start_fraction, self.every = float(start_fraction), int(every)
        self.start_step: dict[str, Optional[int]] = {"wakd": None, "sma": int(sma_start_step)}
        self.averagers = {m: WeightAverager() for m in self.modes if m != "swad"}
        self.swad = (SwadTracker(swad_eval_every, swad_n_converge, swad_n_tolerance, swad_tolerance_ratio)
                     if "swad" in self.modes else None)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], modes: Optional[Sequence[str]] = None) -> "TrainingAverages":
        """Built from the ``averaging`` config section as a plain mapping (the config, or the copy
        saved in a checkpoint's trainer state); ``modes`` overrides the section's modes."""
        return cls(config["modes"] if modes is None else modes, start_fraction=config["start_fraction"],
                   sma_start_step=config["sma_start_step"], every=config["every"],
                   swad_eval_every=config["swad_eval_every"], swad_n_converge=config["swad_n_converge"],
                   swad_n_tolerance=config["swad_n_tolerance"], swad_tolerance_ratio=config["swad_tolerance_ratio"])

    def after_step(self, model: nn.Module, step: int, epochs_done: float, total_epochs: int) -> None:
        """Take the weights after (0-based, global) step ``step``; ``epochs_done`` = epochs completed
        after it (e + (i+1)/n_e for batch i of n_e in epoch e)."""
        if ("wakd" in self.averagers and self.start_step["wakd"] is None
                and epochs_done > self.start_fraction * total_epochs + 1e-9):
            self.start_step["wakd"] = step
        for mode, avg in self.averagers.items():
            t0 = self.start_step[mode]
            if t0 is not None and should_update(step, 0, "sma", start_step=t0, every=self.every):
                avg.update(model)
        if self.swad is not None:
            self.swad.update(model)

    def swad_due(self, step: int) -> bool:
        return self.swad is not None and self.swad.due(step)

    def close_swad_segment(self, val_loss: float) -> None:
        if self.swad is not None:
            self.swad.close_segment(val_loss)

    def counts(self) -> dict[str, int]:
        """Iterates in the WAKD / SMA averages so far (SWAD's window is only final at the end)."""
        return {m: a.n_averaged for m, a in self.averagers.items()}

    def final_states(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """mode → (averaged state dict, description); a mode with no iterate yet is left out."""
        out: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        for mode, avg in self.averagers.items():
            if avg.n_averaged:
                out[mode] = (avg.averaged_state_dict(), {"n_averaged": avg.n_averaged,
                                                         "start_step": self.start_step[mode], "every": self.every})
        if self.swad is not None and (self.swad.segments or self.swad.window.n_averaged
                                      or self.swad.current.n_averaged):
            out["swad"] = self.swad.final_state()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"modes": list(self.modes), "start_step": dict(self.start_step),
                "averagers": {m: a.state_dict() for m, a in self.averagers.items()},
                "swad": None if self.swad is None else self.swad.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["modes"]) != self.modes:
            raise ValueError(f"saved averaging modes {list(state['modes'])} differ from {self.modes}")
        self.start_step = {k: (None if v is None else int(v)) for k, v in state["start_step"].items()}
        self.averagers = {m: _averager(s) for m, s in state["averagers"].items()}
        if self.swad is not None:
            self.swad.load_state_dict(state["swad"])
