"""Run folders: one sub-folder per stage, a meta.json each, atomic writes, overwrite/resume policy.

Policy (DataComp-style): a stage refuses a non-empty output folder unless ``--overwrite`` (start
over) or ``--resume`` (continue an unfinished stage, or reuse a finished one) is given. Resume
refuses when the stage's config or its inputs changed since the folder was written, naming what
changed, so a finished stage is never silently mixed with a different configuration.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from kd3 import __version__
from kd3.errors import RunFolderError

Mode = Optional[Literal["overwrite", "resume"]]
META_NAME = "meta.json"


# --------------------------------------------------------------------------------------- atomic I/O
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line; a crash mid-write leaves at most a truncated last line, which readers skip."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    records = []
    if not Path(path).exists():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from an interrupted run
    return records


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_skipped(skipped: int, total: int, max_fraction: float, what: str, key: str) -> None:
    """Fail (Kd3Error) when more than ``max_fraction`` of ``total`` inputs were skipped: a stage that
    silently dropped a large share of its input would report a result on data it never read."""
    from kd3.errors import Kd3Error

    if total and skipped / total > max_fraction:
        raise Kd3Error(f"{what}: {skipped} of {total} inputs ({skipped / total:.1%}) could not be read, more than "
                       f"{key}={max_fraction:g}; check the files (truncated or corrupt?) or raise {key}")


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "kd3": __version__}
    for name in ("torch", "torchvision", "numpy", "pandas", "pyarrow", "webdataset", "img2dataset",
                 "open_clip_torch", "timm", "faiss-cpu", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- stage folders
@dataclass
class StageDir:
    """The output folder of one stage in one run, with its meta.json bookkeeping."""

    run_dir: Path
    stage: str
    config: dict[str, Any]
    config_fingerprint: str
    inputs: dict[str, str] = field(default_factory=dict)
    #: set when --resume found a finished stage with the same config and inputs
    up_to_date: bool = False
    #: set when --resume continues an unfinished stage
    resumed: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.run_dir / self.stage

    @property
    def meta_path(self) -> Path:
        return self.path / META_NAME

    def write_meta(self, **updates: Any) -> None:
        self.meta.update(updates)
        from kd3 import dist

        if dist.is_main():  # under torchrun, rank 0 alone writes the stage's meta.json
            atomic_write_json(self.meta_path, self.meta)

    def finish(self, counts: dict[str, Any]) -> None:
        self.write_meta(status="complete", counts=counts, finished_at=_now())

    def fail(self, error: str) -> None:
        self.write_meta(status="failed", error=error, failed_at=_now())


def read_meta(stage_path: Path) -> dict[str, Any] | None:
    meta_path = stage_path / META_NAME
    if not meta_path.is_file():
        return None
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise RunFolderError(f"{meta_path}: unreadable meta.json; pass --overwrite to redo this stage") from None


def require_complete(run_dir: Path, stage: str, needed_by: str) -> dict[str, Any]:
    """The meta of an upstream stage, which must have finished."""
    meta = read_meta(run_dir / stage)
    if meta is None or meta.get("status") != "complete":
        state = "missing" if meta is None else f"status {meta.get('status')!r}"
        raise RunFolderError(
            f"{needed_by} needs a finished {stage} stage in {run_dir / stage} ({state}); "
            f"run `kd3 {stage} --run-dir {run_dir}` first")
    return meta


def _diff_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def open_stage(run_dir: Path, stage: str, config: dict[str, Any], config_fingerprint: str,
               inputs: dict[str, str], mode: Mode, argv: list[str] | None = None) -> StageDir:
    """Apply the overwrite/resume policy to ``run_dir/stage`` and write the initial meta.json."""
    out = StageDir(Path(run_dir), stage, config, config_fingerprint, dict(inputs))
    path = out.path
    if path.is_symlink() and mode == "overwrite":
        raise RunFolderError(f"{path} is a symbolic link (to {os.readlink(path)}); --overwrite never deletes through "
                             "a link: remove the link, or pass the run folder it points into as --run-dir")
    non_empty = path.exists() and any(path.iterdir())
    if non_empty and mode is None:
        old = read_meta(path)
        status = f" (status: {old.get('status')})" if old else ""
        raise RunFolderError(
            f"{path} is not empty{status}; pass --resume to reuse or continue it, or --overwrite to start over")
    if non_empty and mode == "overwrite":
        shutil.rmtree(path)
    elif non_empty and mode == "resume":
        old = read_meta(path)
        if old is None:
            raise RunFolderError(f"{path} has files but no {META_NAME}; it is not a kd3 stage folder; "
                                 "pass --overwrite to replace it")
        if old.get("config_fingerprint") != config_fingerprint:
            changed = _diff_keys(old.get("config", {}), config) or ["run.seed"]
            raise RunFolderError(
                f"{path}: cannot resume, config changed since it was written ({', '.join(changed[:5])}); "
                "pass --overwrite to redo this stage")
        if old.get("inputs") != out.inputs:
            changed = _diff_keys(old.get("inputs", {}), out.inputs)
            raise RunFolderError(
                f"{path}: cannot resume, its inputs changed since it was written ({', '.join(changed[:5])}); "
                "pass --overwrite to redo this stage")
        out.meta = old
        if old.get("status") == "complete":
            out.up_to_date = True
            return out
        out.resumed = True
        out.write_meta(status="running", resumed_at=_now(), resume_count=old.get("resume_count", 0) + 1)
        return out
    path.mkdir(parents=True, exist_ok=True)
    out.meta = {
        "stage": stage,
        "status": "running",
        "kd3_version": __version__,
        "started_at": _now(),
        "argv": argv if argv is not None else sys.argv,
        "host": socket.gethostname(),
        "config_fingerprint": config_fingerprint,
        "config": config,
        "inputs": out.inputs,
        "versions": _package_versions(),
    }
    out.write_meta()
    return out


def check_outputs(run_dir: Path, stage: str, current: dict[str, Any], needed_by: str,
                  optional: tuple[str, ...] = ()) -> None:
    """Refuse, naming what changed, when ``stage``'s output files differ from what it recorded in its
    meta.json ``outputs`` when it finished (files truncated, replaced or deleted since). Stage
    folders written before kd3 recorded outputs are not checked; ``optional`` outputs (caches the
    readers can do without) may be deleted, not changed."""
    recorded = (read_meta(Path(run_dir) / stage) or {}).get("outputs")
    if recorded is None:
        return
    recorded = {k: v for k, v in recorded.items() if k in current or k not in optional}
    changed = _diff_keys(recorded, current)
    if changed:
        raise RunFolderError(
            f"{needed_by}: the outputs of {Path(run_dir) / stage} changed after it finished "
            f"({', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}: truncated, replaced or deleted); "
            f"redo it with `kd3 {stage} --overwrite` (then the stages after it)")


def stage_lock_path(run_dir: Path, stage: str) -> Path:
    """``RUN/.<stage>.lock``: beside the stage folder, so --overwrite can delete the folder under the lock."""
    return Path(run_dir) / f".{stage}.lock"


@contextlib.contextmanager
def stage_lock(run_dir: Path, stage: str) -> Iterator[Path]:
    """Hold an exclusive OS lock (flock) on ``run_dir/stage`` for the block; a second process is refused.

    The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a crashed
    stage never leaves a stale lock. The file holds the holder's PID and host, for the refusal message.
    """
    path = stage_lock_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
            raise RunFolderError(f"{Path(run_dir) / stage} is in use by another kd3 process ({holder}); wait for "
                                 f"it to finish or stop it, then rerun (lock file {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {_now()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race with a waiting process)


def stage_input_fingerprint(run_dir: Path, stage: str) -> str:
    """Identify an upstream stage's output by its meta.json (config, counts, finish time)."""
    return file_fingerprint(Path(run_dir) / stage / META_NAME)
