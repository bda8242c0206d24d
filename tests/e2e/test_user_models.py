"""A user's own teacher through the pipeline: the CIFAR-stem torchvision ResNet-18 state dict goes
through import-checkpoint, score and KD³ train; a network from the user's own file, as teacher and
student, through import-checkpoint, score, KD³ train and evaluate."""

from __future__ import annotations

import json
import shutil
import textwrap

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from kd3.cli import main
from kd3.models import allow_user_code, load_model
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow
STATS = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
# one KD³ epoch on the toy pool; the teacher's input (3 x 16 x 16) is the student's too
# (a random teacher is unsure of everything: a low threshold lets the epoch train on many samples)
KD3 = ["train.objective=kd3", "train.selector=kd3_dynamic", "train.epochs=1", "averaging.modes=[]",
       "selectors.kd3_dynamic.threshold=0.05"]

USER_NET = textwrap.dedent('''
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c_out)

        def forward(self, x):
            return self.bn(self.conv(x)).relu()


    class UserNet(nn.Module):
        def __init__(self, num_classes, width):
            super().__init__()
            self.stages = nn.Sequential(Block(3, width), Block(width, 2 * width))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

        def forward(self, x):
            return self.head(self.stages(x))


    def make_net(num_classes, width=8):
        return UserNet(num_classes, width)
''')


def upstream(toy_run, dest):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download"):
        shutil.copytree(run_dir / stage, dest / stage)
    return overrides


def stage(name, run, overrides, *extra):
    return main([name, "--config", str(DEMO_CONFIG), "--run-dir", str(run), *overrides, *extra])


def import_teacher(weights, arch, out, *extra):
    return main(["import-checkpoint", "--weights", str(weights), "--arch", arch, "--num-classes", "10",
                 "--image-size", "16", *STATS, "--out", str(out), *extra])


def check_pipeline(run, overrides, teacher, feature_dim: int, *extra, evaluate: bool = False):
    """score → KD³ train (→ evaluate) with ``teacher``."""
    assert stage("score", run, overrides, f"score.teacher={teacher}", *extra) == 0
    cache = pd.read_parquet(run / "score" / "teacher_outputs.parquet")
    assert len(cache) > 50 and len(cache["feature"].iloc[0]) == feature_dim
    assert stage("train", run, overrides, f"score.teacher={teacher}", *KD3, *extra) == 0
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["samples"] > 0 and "loss_fa" in metrics[0]  # KD³'s feature alignment
    if evaluate:
        assert stage("evaluate", run, overrides, f"evaluate.teacher={teacher}",
                     "evaluate.students={student: '{run}/train/last.pt'}", "evaluate.distillation_samples=0",
                     "evaluate.datasets=[{name: private_test, path: '{run}/demo-data/private_test.npz'}]",
                     *extra) == 0
        rows = json.loads((run / "evaluate" / "report.json").read_text())["rows"]
        assert {(r["model"], r["dataset"], r["n"]) for r in rows} == {("teacher", "private_test", 540),
                                                                     ("student", "private_test", 540)}


def test_torchvision_cifar_stem_resnet18_state_dict_goes_through_the_pipeline(toy_run, tmp_path):
    overrides = upstream(toy_run, tmp_path)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    weights = tmp_path / "resnet18_cifar10.pth"
    torch.save(net.state_dict(), weights)  # the plain state dict: conv1.weight, layer1.0…, fc.weight
    teacher = tmp_path / "teacher.pt"
    assert import_teacher(weights, "torchvision/resnet18", tmp_path / "wrong.pt") == 2  # the 7x7 stem
    assert import_teacher(weights, "torchvision/resnet18-cifar", teacher) == 0
    model, meta, _ = load_model(teacher)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)
    check_pipeline(tmp_path, overrides, teacher, 512)
    from kd3.models import load_student

    student = load_student(tmp_path / "train" / "last.pt")
    assert student(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_a_network_from_the_users_file_as_teacher_and_student(toy_run, tmp_path, capsys):
    overrides = upstream(toy_run, tmp_path)
    net_file = tmp_path / "my_nets.py"
    net_file.write_text(USER_NET)
    arch = f"{net_file}:make_net"
    with allow_user_code([arch]):
        from kd3.models import build_model

        torch.manual_seed(0)
        reference = build_model(arch, 10, 3, {"width": 8}, image_size=16).net
    weights = tmp_path / "user.pth"
    torch.save({"state_dict": reference.state_dict()}, weights)
    teacher = tmp_path / "teacher.pt"
    assert import_teacher(weights, arch, teacher, "--options", "{width: 8}") == 0
    assert "feature map = output of 'stages'" in capsys.readouterr().out
    # the checkpoint names user code: without the config naming it, no stage imports it
    assert stage("score", tmp_path, overrides, f"score.teacher={teacher}") == 2
    assert "is code outside kd3" in capsys.readouterr().err
    trusted = [f"run.user_code=['{arch}']", f"train.student.arch={arch}", "train.student.options={width: 4}"]
    check_pipeline(tmp_path, overrides, teacher, 16, *trusted, evaluate=True)
    with allow_user_code([arch]):
        student, meta, _ = load_model(tmp_path / "train" / "last.pt")
    assert meta.options["student"] == {"arch": arch, "options": {"width": 4, "feature_map": "stages",
                                                                 "classifier": "head.2", "pool": "avg"}}
    assert student(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
