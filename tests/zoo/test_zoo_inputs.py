"""The bad-input zoo, fast part: files, configs, checkpoints and folder states without a pipeline run."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kd3.cli import main
from kd3.config import load_config
from kd3.data import eval_sets
from kd3.data.images import decode_image
from kd3.data.manifest import read_url_list
from kd3.errors import ConfigError, Kd3Error, RunFolderError
from kd3.models import read_checkpoint
from kd3.runs import open_stage, stage_lock
from tests.zoo import make_zoo

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "pipelines" / "demo.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

#: a second process that takes the stage lock, says so, and holds it until its stdin closes
HOLDER = """
import sys
from pathlib import Path
from kd3.runs import stage_lock
with stage_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _holder(run_dir: Path, stage: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), stage], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"  # a handshake, not a sleep
    return proc


# ---------------------------------------------------------------------------------------------- locks
def test_second_process_on_a_locked_stage_is_refused_naming_pid_and_host(tmp_path, capsys):
    proc = _holder(tmp_path, "demo-data")
    try:
        with pytest.raises(RunFolderError, match=rf"in use by another kd3 process \(pid {proc.pid} on host "):
            with stage_lock(tmp_path, "demo-data"):
                pass
        # the CLI: a one-line refusal, exit 2, nothing created in the stage folder
        code = main(["demo-data", "--config", str(DEMO), "--run-dir", str(tmp_path), "--resume", "run.device=cpu"])
        assert code == 2
        err = capsys.readouterr().err
        assert f"pid {proc.pid}" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "demo-data").exists()
    finally:
        proc.stdin.close()
        proc.wait()
    with stage_lock(tmp_path, "demo-data"):  # released when its holder ended
        pass


def test_lock_of_a_killed_holder_is_released(tmp_path):
    proc = _holder(tmp_path, "train")
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    with stage_lock(tmp_path, "train"):
        pass


def test_stage_runs_under_its_lock(tmp_path):
    """While a stage's run() works, another process cannot take its lock (nor resume, nor overwrite)."""
    from kd3.stages.base import execute

    probe = ("import sys; from pathlib import Path; from kd3.runs import stage_lock\n"
             "try:\n    stage_lock(Path(sys.argv[1]), 'toy').__enter__()\nexcept Exception as e:\n"
             "    print(type(e).__name__); sys.exit(0)\nprint('acquired')")

    def run(cfg, out):
        result = subprocess.run([sys.executable, "-c", probe, str(out.run_dir)], capture_output=True, text=True,
                                env=ENV, check=True)
        return {"probe": result.stdout.strip()}

    stage = types.ModuleType("toy")
    stage.NAME, stage.SECTIONS, stage.USES_DEVICE = "toy", ("run",), False
    stage.check, stage.run = (lambda cfg, run_dir: {}), run
    counts = execute(stage, load_config(DEMO, ["run.device=cpu"]), tmp_path, None)
    assert counts["probe"] == "RunFolderError"


# -------------------------------------------------------------------------------- validate, then touch
def test_unavailable_device_fails_before_the_stage_folder_is_touched(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    done = tmp_path / "demo-data"
    done.mkdir()
    (done / "teacher.pt").write_text("kept")
    code = main(["demo-data", "--config", str(DEMO), "--run-dir", str(tmp_path), "--overwrite", "run.device=cuda"])
    assert code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert (done / "teacher.pt").read_text() == "kept"


def test_overwrite_refuses_a_symlinked_stage_folder(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "score").symlink_to(target)
    with pytest.raises(RunFolderError, match="symbolic link"):
        open_stage(tmp_path / "run", "score", {}, "fp", {}, "overwrite")
    assert (target / "keep.txt").exists()


def test_dry_run_reads_the_url_list(tmp_path, capsys):
    lists = make_zoo.url_lists(tmp_path)
    for name in ("empty", "no_url"):
        code = main(["download", "--config", str(DEMO), "--run-dir", str(tmp_path / "run"), "--dry-run",
                     f"download.url_list={lists[name]}", "download.serve_root=null"])
        assert code == 2, name
        assert str(lists[name]) in capsys.readouterr().err
    assert not (tmp_path / "run" / "download").exists()


# ------------------------------------------------------------------------------- no silent conversions
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    wide, narrow = make_zoo.png16(tmp_path)
    decoded, reference = decode_image(wide.read_bytes()), decode_image(narrow.read_bytes())
    assert decoded.dtype == torch.uint8 and decoded.shape == (1, 64, 64)
    flat = decoded.flatten()
    # pixel i holds 16·i: round(16·i / 257) by hand: i=100 → 1600/257 = 6.23 → 6; i=4095 → 65520/257 = 254.9 → 255
    assert [int(flat[0]), int(flat[100]), int(flat[4095])] == [0, 6, 255]
    assert torch.equal(decoded, reference)  # clipping would give 255 from pixel 16 on


def test_wide_integer_image_without_a_declared_range_is_refused():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(buf, format="TIFF")
    with pytest.raises(ValueError, match="range is not declared"):
        decode_image(buf.getvalue())


def test_16_bit_png_in_an_evaluation_folder_is_scaled(tmp_path):
    wide, narrow = make_zoo.png16(tmp_path / "src")
    for label, src in (("0", wide), ("1", narrow)):
        (tmp_path / "set" / label).mkdir(parents=True)
        (tmp_path / "set" / label / src.name).write_bytes(src.read_bytes())
    images, _ = next(eval_sets.open_eval_set("s", tmp_path / "set", ["0", "1"]).batches(8))
    assert torch.equal(images[0], images[1])


def test_thumbnails_scale_16_bit_images(tmp_path):
    from kd3.inspect.sheets import thumbnail

    wide, narrow = make_zoo.png16(tmp_path)
    assert np.array_equal(np.asarray(thumbnail(wide.read_bytes(), 64)), np.asarray(thumbnail(narrow.read_bytes(), 64)))


def test_float_labels_in_an_evaluation_npz_are_refused(tmp_path):
    path = make_zoo.npz_float_labels(tmp_path)
    with pytest.raises(Kd3Error, match=r"labels must be integer class indices, got dtype float64 \(1.7, 3.9"):
        eval_sets.open_eval_set("s", path, [str(i) for i in range(10)])


def test_four_channel_evaluation_npz_is_a_one_line_error(tmp_path):
    path = make_zoo.npz_rgba(tmp_path)
    with pytest.raises(Kd3Error, match=r"rgba.npz: images of shape \(3, 8, 8, 4\) have neither 1 nor 3 channels"):
        eval_sets.open_eval_set("s", path, [str(i) for i in range(10)])


@pytest.mark.parametrize("keep", [0.33, 0.3])
def test_truncated_evaluation_tar_is_named_as_truncated(tmp_path, keep):
    path = make_zoo.truncated_tar(tmp_path, keep)
    with pytest.raises(Kd3Error, match=r"truncated.tar: not a complete tar file"):
        eval_sets.check_tar(path)
    eval_sets.check_tar(make_zoo.labelled_tar(tmp_path / "whole.tar"))  # an intact one passes


# --------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("maker", [make_zoo.pickled_checkpoint, make_zoo.raw_pickle])
def test_pickled_checkpoint_refusal_names_what_and_never_suggests_unsafe_loading(tmp_path, maker, capsys):
    path = maker(tmp_path)
    with pytest.raises(Kd3Error) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "weights_only=False" not in message and "\n" not in message
    assert "never unpickled" in message
    if maker is make_zoo.pickled_checkpoint:
        assert "pickled print object" in message
    assert "unpickled: a weights-only" not in capsys.readouterr().out  # the payload never ran


# ------------------------------------------------------------------------------------ configs, lists
@pytest.mark.parametrize("name, expected", [("bad_yaml.yaml", "YAML"), ("unknown_key.yaml", "run.sede"),
                                            ("wrong_type.yaml", "run.seed"), ("out_of_range.yaml", "train.epochs"),
                                            ("bool_as_int.yaml", "train.epochs: expected a number, got true")])
def test_bad_configs_are_one_line_errors_naming_the_key(tmp_path, name, expected):
    path = make_zoo.configs(tmp_path)[name]
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_bool_for_a_number_override_is_refused_but_bools_stay_bools():
    with pytest.raises(ConfigError, match="train.epochs: expected a number, got true"):
        load_config(DEMO, ["train.epochs=true"])
    assert load_config(DEMO, ["run.deterministic=false"]).run.deterministic is False


@pytest.mark.parametrize("name, expected", [("empty", r"no http\(s\) URL"), ("blank", r"no http\(s\) URL"),
                                            ("no_url", "no 'url' or 'URL' column")])
def test_bad_url_lists(tmp_path, name, expected):
    path = make_zoo.url_lists(tmp_path)[name]
    with pytest.raises(Kd3Error, match=expected):
        read_url_list(path)


def test_reserved_columns_are_kept_aside_not_passed_to_img2dataset(tmp_path):
    """img2dataset refuses lists carrying its own column names: kd3 keeps them in url_list.parquet only."""
    urls = read_url_list(make_zoo.url_lists(tmp_path)["reserved"])
    assert "status" in urls.frame.columns and "status" not in urls.extra_columns


def test_make_zoo_writes_every_file(tmp_path):
    made = make_zoo.make_all(tmp_path)
    assert made and all(p.is_file() for p in made)


# --------------------------------------------------------------------------------- gates, fingerprints
def test_skipped_share_gate_by_hand():
    from kd3.runs import check_skipped

    check_skipped(1, 100, 0.01, "pool", "score.max_skipped_fraction")  # 1 % is not more than 1 %
    check_skipped(0, 0, 0.0, "pool", "score.max_skipped_fraction")  # nothing to read, nothing skipped
    with pytest.raises(Kd3Error, match=r"pool: 2 of 100 inputs \(2.0%\) could not be read, more than "
                                       r"score.max_skipped_fraction=0.01"):
        check_skipped(2, 100, 0.01, "pool", "score.max_skipped_fraction")


def test_recorded_outputs_are_compared_by_name_and_old_folders_pass(tmp_path):
    import json

    from kd3.runs import check_outputs

    (tmp_path / "download").mkdir()
    meta = tmp_path / "download" / "meta.json"
    meta.write_text(json.dumps({"status": "complete"}))
    check_outputs(tmp_path, "download", {"shards": {"00000": "tar 10"}}, "score")  # written by an older kd3
    meta.write_text(json.dumps({"status": "complete", "outputs": {"shards": {"00000": "tar 10", "00001": "tar 5"}}}))
    check_outputs(tmp_path, "download", {"shards": {"00000": "tar 10", "00001": "tar 5"}}, "score")
    with pytest.raises(RunFolderError, match=r"score: the outputs of .*download changed after it finished "
                                             r"\(shards.00001: truncated, replaced or deleted\)"):
        check_outputs(tmp_path, "download", {"shards": {"00000": "tar 10", "00001": "tar 3"}}, "score")


def test_optional_outputs_may_be_deleted_not_changed(tmp_path):
    import json

    from kd3.runs import check_outputs

    (tmp_path / "score").mkdir()
    (tmp_path / "score" / "meta.json").write_text(json.dumps({"outputs": {"cache": "10 bytes", "pixels": "4 bytes"}}))
    check_outputs(tmp_path, "score", {"cache": "10 bytes"}, "train", optional=("pixels",))
    with pytest.raises(RunFolderError, match=r"\(pixels: "):
        check_outputs(tmp_path, "score", {"cache": "10 bytes", "pixels": "3 bytes"}, "train", optional=("pixels",))
    with pytest.raises(RunFolderError, match=r"\(cache: "):
        check_outputs(tmp_path, "score", {"pixels": "4 bytes"}, "train", optional=("pixels",))
