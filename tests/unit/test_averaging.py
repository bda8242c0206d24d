"""Weight averaging (WAKD / SMA / SWAD, METHODS.md §2): hand-computed values and exactness."""

import io

import pytest
import torch
from torch import nn

from kd3.methods.averaging import (WeightAverager, merge_segment_averages, should_update,
                                   swad_window)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _train_step(model: nn.Module, seed: int) -> None:
    # one SGD step in train mode: changes parameters and BN running stats / num_batches_tracked
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad


def test_running_average_is_mean_of_iterates_with_bn():
    model, avg, saved = _tiny_model(), WeightAverager(), []
    for seed in range(4):
        _train_step(model, seed)
        avg.update(model)
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
    assert avg.n_averaged == 4
    out = avg.averaged_state_dict()
    assert set(out) == set(saved[0])
    for key, value in out.items():
        assert value.dtype == saved[-1][key].dtype
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.stack([s[key] for s in saved]).mean(0))
        else:  # BN num_batches_tracked: latest value (4 training steps)
            assert value.item() == 4
    fresh = _tiny_model()
    fresh.load_state_dict(out)  # strict by default


def test_running_average_golden_values():
    # a single scalar parameter taking values 1, 2, 6 → mean 3; a float64 one 0.5, 1.5 → 1.0
    avg = WeightAverager()
    for v in (1.0, 2.0, 6.0):
        avg.update({"w": torch.tensor([v]), "step": torch.tensor(int(v))})
    assert avg.averaged_state_dict()["w"].item() == 3.0
    assert avg.averaged_state_dict()["step"].item() == 6  # integer entry: latest
    avg64 = WeightAverager()
    for v in (0.5, 1.5):
        avg64.update({"w": torch.tensor([v], dtype=torch.float64)})
    out = avg64.averaged_state_dict()["w"]
    assert out.dtype == torch.float64 and out.item() == 1.0


def test_half_precision_entry_is_accumulated_in_float32_and_returned_as_half():
    avg = WeightAverager()
    for v in (1.0, 2.0):
        avg.update({"w": torch.tensor([v], dtype=torch.float16)})
    assert avg.state_dict()["average"]["w"].dtype == torch.float32
    out = avg.averaged_state_dict()["w"]
    assert out.dtype == torch.float16 and out.item() == 1.5


def test_state_dict_round_trip_then_continue_equals_uninterrupted():
    model_a, model_b = _tiny_model(), _tiny_model()
    full = WeightAverager()
    part = WeightAverager()
    for seed in range(2):
        _train_step(model_a, seed)
        full.update(model_a)
        _train_step(model_b, seed)
        part.update(model_b)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = WeightAverager()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.n_averaged == 2
    for seed in range(2, 4):
        _train_step(model_a, seed)
        full.update(model_a)
        _train_step(model_b, seed)
        resumed.update(model_b)
    assert resumed.n_averaged == full.n_averaged == 4
    a, b = full.averaged_state_dict(), resumed.averaged_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merge_is_count_weighted():
    first, second = WeightAverager(), WeightAverager()
    for v in (1.0, 2.0):  # mean 1.5, n = 2
        first.update({"w": torch.tensor([v]), "t": torch.tensor(1)})
    second.update({"w": torch.tensor([6.0]), "t": torch.tensor(7)})  # n = 1
    first.merge(second)
    # (2·1.5 + 1·6)/3 = 3
    assert first.n_averaged == 3
    assert first.averaged_state_dict()["w"].item() == pytest.approx(3.0)
    assert first.averaged_state_dict()["t"].item() == 7
    with pytest.raises(ValueError):
        first.merge(_with({"v": torch.tensor([1.0])}))


def _with(state):
    a = WeightAverager()
    a.update(state)
    return a


def test_update_with_changed_keys_raises():
    avg = _with({"w": torch.tensor([1.0])})
    with pytest.raises(ValueError):
        avg.update({"v": torch.tensor([1.0])})
    with pytest.raises(ValueError):
        WeightAverager().averaged_state_dict()


def test_should_update_wakd():
    # start = floor(0.1·100) = 10
    assert not should_update(9, 100, "wakd")
    assert should_update(10, 100, "wakd")
    assert should_update(99, 100, "wakd")
    # every 5 from 10: 10, 15, 20 …
    assert should_update(15, 100, "wakd", every=5)
    assert not should_update(12, 100, "wakd", every=5)
    # floor(0.1·25) = floor(2.5) = 2
    assert not should_update(1, 25, "wakd") and should_update(2, 25, "wakd")
    # 0.29·100 is 28.999999999999996 in floating point; the start is still 29
    assert not should_update(28, 100, "wakd", start_fraction=0.29)
    assert should_update(29, 100, "wakd", start_fraction=0.29)


def test_should_update_sma():
    got = [should_update(s, 20, "sma", start_step=7, every=2) for s in range(6, 12)]
    assert got == [False, True, False, True, False, True]  # steps 7, 9, 11
    assert should_update(0, 20, "sma")  # default start_step 0, every step


def test_should_update_bad_mode_lists_choices():
    with pytest.raises(ValueError, match="wakd.*sma"):
        should_update(0, 10, "ema")
    with pytest.raises(ValueError):
        should_update(0, 10, "sma", every=0)


CURVE = [1.0, 0.8, 0.6, 0.5, 0.55, 0.52, 0.6, 0.9, 1.2, 1.3, 1.4, 1.5]


def test_swad_window_hand_curve():
    # converge queues: [1,.8,.6] min last; [.8,.6,.5] no; [.6,.5,.55] no; [.5,.55,.52] min first
    # → s = 3. threshold = 1.3·(.5+.55+.52)/3 = 1.3·0.52333 = 0.68033.
    # j=4: min(.55,.52,.6)=.52 ok; j=5: min(.52,.6,.9)=.52 ok; j=6: min(.6,.9,1.2)=.6 ok;
    # j=7: min(.9,1.2,1.3)=.9 > .68 → dies → end = 6.
    assert swad_window(CURVE, n_converge=3, n_tolerance=3, tolerance_ratio=0.3) == (3, 6)
    # ratio 0.8: threshold = 1.8·0.52333 = 0.942 → j=7: .9 ok; j=8: min(1.2,1.3,1.4) dies → end 7
    assert swad_window(CURVE, n_converge=3, n_tolerance=3, tolerance_ratio=0.8) == (3, 7)


def test_swad_window_remainder_and_never_dying():
    # s = 0, threshold = 1.3·(.5+.6+.55)/3 = 0.715. j=3: remainder min(.6,.9,1.0) = .6 ok;
    # j=4: remainder min(.9, 1.0) = .9 > .715 → end = 3.
    assert swad_window([0.5, 0.6, 0.55, 0.6, 0.9, 1.0], 3, 6, 0.3) == (0, 3)
    # s = 1 ([.5,.6,.55]), threshold .715; nothing later exceeds it → end = last index 4
    assert swad_window([1.0, 0.5, 0.6, 0.55, 0.58], 3, 6, 0.3) == (1, 4)


def test_swad_window_tolerates_a_single_spike():
    # s = 0, threshold 1.3·(.5+.55+.52)/3 = 0.68033. The spike .9 at j=3 is smoothed away by the
    # tolerance window: min(.9,.6,.6) = .6 ok; j=4, 5 ok (.6); j=6: min(1.2,1.3,1.4) > thr → end 5.
    assert swad_window([0.5, 0.55, 0.52, 0.9, 0.6, 0.6, 1.2, 1.3, 1.4], 3, 3, 0.3) == (0, 5)


def test_swad_window_never_converges():
    assert swad_window([1.0, 0.9, 0.8, 0.7, 0.6, 0.5]) is None  # strictly decreasing
    assert swad_window([0.5, 0.6]) is None  # shorter than the converge queue


def test_swad_window_short_tolerance_adds_converge_queue_unconditionally():
    # n_tolerance 1 < n_converge 3: reference adds s+1..s+2 at convergence; s = 0,
    # threshold = 1.3·(0.1+1+1)/3 = 0.91; first check j = 3: 1.0 > 0.91 → end = 2.
    assert swad_window([0.1, 1.0, 1.0, 1.0], n_converge=3, n_tolerance=1) == (0, 2)


def test_merge_segment_averages_by_hand():
    seg1 = ({"w": torch.tensor([1.0, 2.0]), "t": torch.tensor(3)}, 2)
    seg2 = ({"w": torch.tensor([4.0, 8.0]), "t": torch.tensor(5)}, 1)
    out = merge_segment_averages([seg1, seg2])
    # (2·(1,2) + 1·(4,8))/3 = (6/3, 12/3) = (2, 4); integer entry from the last segment
    assert out["w"].tolist() == pytest.approx([2.0, 4.0])
    assert out["t"].item() == 5
    with pytest.raises(ValueError):
        merge_segment_averages([])
    with pytest.raises(ValueError):
        merge_segment_averages([seg1, ({"v": torch.tensor([1.0])}, 1)])
