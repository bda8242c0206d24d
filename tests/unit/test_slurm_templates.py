"""pipelines/slurm: the sbatch templates and the chain script, run with stand-ins for sbatch, srun and
scontrol (Slurm is absent here) that record what they were asked; the torchrun command lines, the
afterok chain and the requeue after preemption are checked."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "pipelines" / "slurm"
STAGES = ["download", "score", "dedup", "select", "train", "average", "evaluate", "inspect"]

FAKE = {
    # srun: record the command; pretend the stage failed as preempted when asked to
    "srun": """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/srun"
if [ -n "${FAKE_PREEMPT:-}" ]; then
  mkdir -p "$RUN/train"; echo '{"status": "failed", "error": "Preempted: SIGTERM"}' > "$RUN/train/meta.json"; exit 1
fi
""",
    "scontrol": """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol"
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node-7\\ngpu-node-8\\n'
exit 0
""",
    "sbatch": """#!/usr/bin/env bash
n=$(( $(cat "$FAKE_LOG/next" 2>/dev/null || echo 1000) + 1 )); echo "$n" > "$FAKE_LOG/next"
echo "$* | CONFIG=$CONFIG RUN=$RUN KD3_REPO=$KD3_REPO" >> "$FAKE_LOG/sbatch"
echo "$n;cluster"
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(), log.mkdir()
    for name, body in FAKE.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "KD3_PYTHON": "/venv/bin/python",
           "CONFIG": "pipelines/cifar_web.yaml", "RUN": str(tmp_path / "run")}
    return env, log


def _run(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, cwd=REPO)


def test_every_stage_has_a_template_that_requeues_and_signals_before_the_end():
    for stage in STAGES:
        text = (SLURM / f"{stage}.sbatch").read_text()
        assert f"#SBATCH --job-name=kd3-{stage}" in text and "#SBATCH --requeue" in text
        assert "#SBATCH --signal=TERM@" in text and f"run_stage.sh\" {stage} " in text


def test_distributed_stages_launch_torchrun_per_node_with_a_rendezvous_on_the_first_node(fake_slurm):
    env, log = fake_slurm
    for stage in ("score", "train", "evaluate"):
        done = _run(SLURM / f"{stage}.sbatch", env, "train.epochs=3")
        assert done.returncode == 0, done.stderr
    lines = (log / "srun").read_text().splitlines()
    assert len(lines) == 3
    for stage, line in zip(("score", "train", "evaluate"), lines):
        assert line == (f"--nodes 2 --ntasks-per-node 1 /venv/bin/python -m torch.distributed.run --nnodes 2 "
                        f"--nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint gpu-node-7:29500 "
                        f"--rdzv-id kd3-4242-{stage} -m kd3.cli {stage} --config pipelines/cifar_web.yaml "
                        f"--run-dir {env['RUN']} --resume train.epochs=3")


def test_other_stages_run_once_without_torchrun(fake_slurm):
    env, log = fake_slurm
    done = _run(SLURM / "download.sbatch", env)
    assert done.returncode == 0, done.stderr
    assert (log / "srun").read_text().strip() == (
        f"--nodes 1 --ntasks 1 /venv/bin/python -m kd3.cli download --config pipelines/cifar_web.yaml "
        f"--run-dir {env['RUN']} --resume")


def test_a_preempted_stage_requeues_its_own_job(fake_slurm):
    env, log = fake_slurm
    done = _run(SLURM / "train.sbatch", {**env, "FAKE_PREEMPT": "1"})
    assert done.returncode == 0, done.stderr  # requeued, not failed: the chain keeps waiting
    assert "requeue 4242" in (log / "scontrol").read_text()
    assert "preempted" in done.stdout


def test_a_failed_stage_fails_the_job_and_is_not_requeued(fake_slurm, tmp_path):
    env, log = fake_slurm
    srun = Path(env["PATH"].split(":")[0]) / "srun"
    srun.write_text("#!/usr/bin/env bash\nexit 2\n")
    done = _run(SLURM / "train.sbatch", env)
    assert done.returncode == 2
    assert "requeue" not in (log / "scontrol").read_text()


def test_chain_submits_every_stage_after_the_previous_one_succeeded(fake_slurm):
    env, log = fake_slurm
    env = {k: v for k, v in env.items() if k != "KD3_REPO"}
    done = _run(SLURM / "submit_chain.sh", {**env, "SBATCH_ARGS": "--account=lab"})
    assert done.returncode == 0, done.stderr
    assert [line.split() for line in done.stdout.splitlines()] == [[s, str(1001 + i)] for i, s in enumerate(STAGES)]
    calls = (log / "sbatch").read_text().splitlines()
    assert len(calls) == len(STAGES)
    for i, (stage, call) in enumerate(zip(STAGES, calls)):
        args, exported = call.split(" | ")
        assert args.startswith("--parsable --export ALL --account=lab")
        assert args.endswith(f"pipelines/slurm/{stage}.sbatch")
        dependency = re.search(r"--dependency afterok:(\d+)", args)
        assert (dependency is None) if i == 0 else dependency.group(1) == str(1000 + i)
        assert exported == f"CONFIG=pipelines/cifar_web.yaml RUN={env['RUN']} KD3_REPO={REPO}"
    assert _run(SLURM / "submit_chain.sh", env, "nosuchstage").returncode == 2
