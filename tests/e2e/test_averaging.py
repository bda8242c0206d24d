"""Weight averaging and ND at toy scale: averages equal the mean of the saved iterates, survive a
resume exactly, and `kd3 average` writes loadable student checkpoints; ND trains the student."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import kd3.training.build as train_build
from kd3.cli import main
from kd3.models import load_model, load_student
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow
# plain KD on the whole pool (minus SWAD's held-out split): 114 samples, 4 steps per epoch, 12 steps;
# WAKD from step floor(0.25·12) = 3 and SMA from step 2, both every 2 steps; SWAD segments of 2 steps
AVERAGING = ["train.objective=kd", "train.selector=all", "train.epochs=3", "averaging.modes=[wakd,sma,swad]",
             "averaging.start_fraction=0.25", "averaging.sma_start_step=2", "averaging.every=2",
             "averaging.swad_eval_every=2", "averaging.swad_n_converge=2", "averaging.swad_n_tolerance=2"]


def upstream_copy(toy_run, dest):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score", "select"):
        shutil.copytree(run_dir / stage, dest / stage)
    return overrides


def stage(name, dest, overrides, *extra):
    return main([name, "--config", str(DEMO_CONFIG), "--run-dir", str(dest), *overrides, *AVERAGING, *extra])


def test_averaged_weights_are_the_mean_of_the_training_iterates(toy_run, tmp_path, monkeypatch):
    overrides = upstream_copy(toy_run, tmp_path)
    iterates: list[dict[str, torch.Tensor]] = []
    built = {}
    real_build = train_build.build_objective

    def build(*args, **kwargs):
        result = real_build(*args, **kwargs)
        built["student"] = result.student
        return result

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            result = super().step(closure)
            iterates.append({k: v.detach().clone() for k, v in built["student"].state_dict().items()})
            return result

    monkeypatch.setattr(train_build, "build_objective", build)
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    assert stage("train", tmp_path, overrides) == 0
    assert stage("average", tmp_path, overrides) == 0
    assert len(iterates) == 12
    counts = json.loads((tmp_path / "average" / "meta.json").read_text())["counts"]
    assert counts["n_averaged"]["wakd"] == 5 and counts["n_averaged"]["sma"] == 5
    lo, hi = counts["swad_steps"]
    expected_steps = {"wakd": [3, 5, 7, 9, 11], "sma": [2, 4, 6, 8, 10], "swad": list(range(lo, hi + 1))}
    assert counts["n_averaged"]["swad"] == hi - lo + 1
    for mode, steps in expected_steps.items():
        state = torch.load(tmp_path / "average" / f"{mode}.pt", weights_only=True)["state_dict"]
        for key, value in state.items():
            if value.is_floating_point():
                mean = torch.stack([iterates[s][key] for s in steps]).mean(0)
                torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-6, msg=f"{mode} {key}")
            else:  # BN step counters: the latest averaged iterate's
                assert torch.equal(value, iterates[steps[-1]][key]), (mode, key)


def test_resume_in_the_middle_of_averaging_gives_the_uninterrupted_averages(toy_run, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = upstream_copy(toy_run, full)
    upstream_copy(toy_run, cut)
    assert stage("train", full, overrides) == 0
    assert stage("train", cut, overrides) == 0
    # rewind to the state right after epoch 1 of 3 (averages and a SWAD segment half-way), then resume
    for e in (1, 2):
        (cut / "train" / f"epoch_{e:03d}.pt").unlink()
    shutil.copyfile(cut / "train" / "epoch_000.pt", cut / "train" / "last.pt")
    meta = json.loads((cut / "train" / "meta.json").read_text())
    meta["status"] = "running"
    (cut / "train" / "meta.json").write_text(json.dumps(meta))
    assert stage("train", cut, overrides, "--resume") == 0
    a = torch.load(full / "train" / "last.pt", weights_only=True)["trainer"]
    b = torch.load(cut / "train" / "last.pt", weights_only=True)["trainer"]
    assert a["global_step"] == b["global_step"] == 12
    assert a["averaging"]["swad"]["losses"] == pytest.approx(b["averaging"]["swad"]["losses"], abs=1e-6)
    for run in (full, cut):
        assert stage("average", run, overrides) == 0
    for mode in ("wakd", "sma", "swad"):
        sa = torch.load(full / "average" / f"{mode}.pt", weights_only=True)
        sb = torch.load(cut / "average" / f"{mode}.pt", weights_only=True)
        assert sa["averaged"]["n_averaged"] == sb["averaged"]["n_averaged"]
        for key in sa["state_dict"]:
            torch.testing.assert_close(sa["state_dict"][key], sb["state_dict"][key], rtol=0, atol=1e-6)


def test_average_writes_loadable_students_and_needs_averages(toy_run, tmp_path, capsys):
    run_dir, overrides = toy_run
    for folder in ("average", "train"):
        assert (run_dir / folder / "meta.json").exists()
    student_meta = load_model(run_dir / "train" / "last.pt")[1]
    for mode in ("wakd", "sma", "swad"):
        model, meta, payload = load_model(run_dir / "average" / f"{mode}.pt")
        assert meta == student_meta and payload["averaged"]["mode"] == mode
        size = meta.input.image_size
        assert load_student(run_dir / "average" / f"{mode}.pt")(torch.zeros(2, 1, size, size)).shape == (2, 10)
    counts = json.loads((run_dir / "average" / "meta.json").read_text())["counts"]
    assert set(counts["n_averaged"]) == {"wakd", "sma", "swad"} and counts["bn_recompute"] is False
    # the held-out SWAD split is never selected nor trained on
    held_out = set(pd.read_parquet(run_dir / "train" / "validation.parquet")["uid"])
    assert held_out
    for manifest in sorted((run_dir / "train" / "selection").glob("epoch_*.parquet")):
        frame = pd.read_parquet(manifest)
        rows = frame[frame["uid"].isin(held_out)]
        assert len(rows) == len(held_out) and not rows["selected"].any() and rows["weight"].isna().all()
    # a training run without averages: a one-line error naming the key to set
    shutil.copytree(run_dir / "train-kd", tmp_path / "train-kd")
    meta = json.loads((tmp_path / "train-kd" / "meta.json").read_text())
    meta["config"]["averaging"]["modes"] = []
    (tmp_path / "train-kd" / "meta.json").write_text(json.dumps(meta))
    assert main(["average", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides,
                 "train.output=train-kd"]) == 2
    err = capsys.readouterr().err.strip()
    assert "averaging.modes" in err and err.count("\n") == 0 and not (tmp_path / "average-kd").exists()


def test_bn_recompute_re_estimates_statistics_on_the_training_data(toy_run, tmp_path):
    run_dir, overrides = toy_run
    for folder in ("download", "score", "select", "train-kd"):
        shutil.copytree(run_dir / folder, tmp_path / folder)
    args = ["average", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides, "train.output=train-kd"]
    assert main([*args, "average.bn_recompute=true"]) == 0
    recomputed = torch.load(tmp_path / "average-kd" / "wakd.pt", weights_only=True)
    averaged = torch.load(run_dir / "average" / "wakd.pt", weights_only=True)  # KD³ run: only a sanity reference
    assert recomputed["averaged"]["bn_recomputed_on"] > 0 and averaged["averaged"].get("bn_recomputed_on") is None
    assert main([*args, "--overwrite"]) == 0
    plain = torch.load(tmp_path / "average-kd" / "wakd.pt", weights_only=True)["state_dict"]
    stats = [k for k in plain if k.endswith("running_mean")]
    assert stats and any(not torch.allclose(plain[k], recomputed["state_dict"][k]) for k in stats)
    weights = [k for k in plain if k.endswith("weight")]
    assert all(torch.equal(plain[k], recomputed["state_dict"][k]) for k in weights)  # only statistics change
    load_student(tmp_path / "average-kd" / "wakd.pt")


@pytest.mark.parametrize("method", ["kd", "kd3"])
def test_nd_loss_is_a_logged_term_with_a_checkpointed_head(toy_run, tmp_path, method):
    overrides = upstream_copy(toy_run, tmp_path)
    assert main(["train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides,
                 f"train.objective={method}", "train.epochs=1", "train.extra_losses=[nd]", "train.nd_weight=0.5",
                 "averaging.modes=[]"]) == 0
    record = json.loads((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < record["loss_nd"] <= 0.5 * 2  # λ·L_ND, and L_ND = 1 − cos·ratio ≤ 2
    assert record["loss"] == pytest.approx(sum(v for k, v in record.items() if k.startswith("loss_")), rel=1e-5)
    trainer = torch.load(tmp_path / "train" / "last.pt", weights_only=True)["trainer"]
    assert {"head.linear.weight", "head.bn.running_mean"} <= set(trainer["training_only"])
    assert not any(k.startswith("inner.student.") for k in trainer["training_only"])
    load_student(tmp_path / "train" / "last.pt")
