"""Averages kept during training (WAKD / SMA / SWAD segments): golden values, equivalence with the
keep-every-segment computation, exact checkpointing."""

import io

import pytest
import torch

from kd3.methods.averaging import merge_segment_averages, should_update, swad_window
from kd3.methods.averaging_tracker import SwadTracker, TrainingAverages, map_tensors


def weights(value: float) -> dict[str, torch.Tensor]:
    # a two-entry "model": a float weight and an integer counter (BN num_batches_tracked-like)
    return {"w": torch.tensor([value, 2 * value]), "n": torch.tensor(int(value))}


def run_swad(losses, eval_every, **kw):
    """Feed steps with weight = step index; close a segment with losses[k] every eval_every steps."""
    tracker = SwadTracker(eval_every, **kw)
    for step in range(len(losses) * eval_every):
        tracker.update(weights(float(step)))
        if tracker.due(step):
            tracker.close_segment(losses[(step + 1) // eval_every - 1])
    return tracker


def brute_force(losses, eval_every, n_converge, n_tolerance, ratio):
    """Every segment kept, then swad_window + merge_segment_averages (the definition)."""
    window = swad_window(losses, n_converge, n_tolerance, ratio)
    if window is None:
        return None
    start, end = window
    segments = []
    for k in range(start, end + 1):
        steps = range(k * eval_every, (k + 1) * eval_every)
        mean = sum(float(s) for s in steps) / eval_every
        segments.append(({"w": torch.tensor([mean, 2 * mean]), "n": torch.tensor(steps[-1])}, eval_every))
    return merge_segment_averages(segments)


def test_swad_golden_window_and_weights():
    # steps 0..7 with w = step, segments of 2 steps: means 0.5, 2.5, 4.5, 6.5.
    # n_converge 2: s=0 fails (1.0 > 0.5), s=1 holds (0.5 ≤ 0.6) → start 1, threshold 1.3·0.55 = 0.715;
    # n_tolerance 1 < n_converge: segments 1, 2 join unconditionally, segment 3 (2.0 > 0.715) kills
    # the valley → window (1, 2) = steps 2..5 → SWAD weight mean(2, 3, 4, 5) = 3.5
    tracker = run_swad([1.0, 0.5, 0.6, 2.0], 2, n_converge=2, n_tolerance=1, tolerance_ratio=0.3)
    assert tracker.dead and tracker.start == 1 and tracker.end == 2
    state, info = tracker.final_state()
    assert info["window"] == [1, 2] and info["steps"] == [2, 5] and info["n_averaged"] == 4
    assert state["w"].tolist() == [3.5, 7.0]
    assert state["n"].item() == 5  # integer entries: latest value in the window


@pytest.mark.parametrize("losses, nc, nt", [
    ([1.0, 0.8, 0.6, 0.5, 0.55, 0.52, 0.6, 0.9, 1.2, 1.3], 3, 3),   # the swad_window docstring example
    ([1.0, 0.8, 0.6, 0.5, 0.55, 0.52, 0.6, 0.9, 1.2, 1.3], 3, 6),   # reference defaults, dies late
    ([0.9, 0.7, 0.8, 0.75, 0.7, 0.72, 0.71, 0.73], 3, 6),            # never dies: window to the end
    ([0.9, 0.7, 0.8, 0.75, 5.0, 5.0, 0.71, 0.73, 0.7], 4, 2),        # n_tolerance < n_converge
    ([2.0, 1.0, 1.1, 1.05, 3.0, 0.5, 0.4, 0.3], 2, 1),
])
def test_swad_online_bookkeeping_equals_keeping_every_segment(losses, nc, nt):
    tracker = run_swad(losses, 3, n_converge=nc, n_tolerance=nt, tolerance_ratio=0.3)
    # an evaluation after the valley died is not recorded: compare with the curve the tracker saw
    expected = brute_force(tracker.losses, 3, nc, nt, 0.3)
    state, info = tracker.final_state()
    assert info["window"] == list(swad_window(tracker.losses, nc, nt, 0.3))
    torch.testing.assert_close(state["w"], expected["w"])
    assert state["n"].item() == expected["n"].item()
    # memory stays bounded: never more pending segments than the tolerance/converge windows need
    assert len(tracker.segments) <= max(nc, nt) + 1


def test_swad_without_a_valley_falls_back_to_the_last_segment():
    tracker = run_swad([3.0, 2.0, 1.0, 0.5], 2)  # decreasing: no converge queue has its min first
    state, info = tracker.final_state()
    assert info["window"] is None and "no loss valley" in info["fallback"]
    assert info["steps"] == [6, 7] and state["w"].tolist() == [6.5, 13.0]
    early = SwadTracker(10)
    for step in range(3):
        early.update(weights(float(step)))
    state, info = early.final_state()
    assert state["w"].tolist() == [1.0, 2.0] and "no validation evaluation" in info["fallback"]


def test_wakd_start_matches_should_update_with_constant_steps_per_epoch():
    epochs, per_epoch = 3, 7
    total = epochs * per_epoch
    for fraction in (0.0, 0.1, 0.29, 0.5, 1.0):
        avg = TrainingAverages(["wakd", "sma"], start_fraction=fraction, sma_start_step=4, every=3)
        step = 0
        for epoch in range(epochs):
            for i in range(per_epoch):
                avg.after_step({"w": torch.tensor([float(step)])}, step, epoch + (i + 1) / per_epoch, epochs)
                step += 1
        wakd = [s for s in range(total) if should_update(s, total, "wakd", fraction, every=3)]
        sma = [s for s in range(total) if should_update(s, total, "sma", start_step=4, every=3)]
        assert avg.counts() == {"wakd": len(wakd), "sma": len(sma)}, fraction
        finals = avg.final_states()
        if wakd:
            assert finals["wakd"][0]["w"].item() == pytest.approx(sum(wakd) / len(wakd))
        else:
            assert "wakd" not in finals
        assert finals["sma"][0]["w"].item() == pytest.approx(sum(sma) / len(sma))  # 4, 7, …, 19 → 11.5


def test_checkpointed_state_resumes_exactly_and_loads_weights_only():
    def steps(avg, start, stop):
        for step in range(start, stop):
            avg.after_step({"w": torch.tensor([float(step) ** 0.5])}, step, (step + 1) / 5, 6)
            if avg.swad_due(step):
                avg.close_swad_segment([1.0, 0.6, 0.7, 0.65, 0.8, 2.0, 3.0, 3.0, 3.0, 3.0][step // 3])

    kw = dict(start_fraction=0.1, sma_start_step=2, every=2, swad_eval_every=3, swad_n_converge=2,
              swad_n_tolerance=2)
    full = TrainingAverages(["wakd", "sma", "swad"], **kw)
    steps(full, 0, 30)
    part = TrainingAverages(["wakd", "sma", "swad"], **kw)
    steps(part, 0, 13)  # mid-segment, mid-valley
    buffer = io.BytesIO()
    torch.save(map_tensors(part.state_dict(), lambda t: t.cpu()), buffer)
    buffer.seek(0)
    resumed = TrainingAverages(["wakd", "sma", "swad"], **kw)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    steps(resumed, 13, 30)
    a, b = full.final_states(), resumed.final_states()
    assert set(a) == set(b) == {"wakd", "sma", "swad"}
    for mode in a:
        assert torch.equal(a[mode][0]["w"], b[mode][0]["w"]), mode
        assert a[mode][1] == b[mode][1]
    with pytest.raises(ValueError, match="modes"):
        TrainingAverages(["wakd"]).load_state_dict(full.state_dict())
