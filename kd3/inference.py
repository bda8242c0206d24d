"""Running a model over images: the web pool (shards, keyed by score-cache row) or decoded batches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch

from kd3 import dist
from kd3.compute import Compute
from kd3.data.images import prepare_uint8
from kd3.data.pixel_cache import PoolPixels
from kd3.data.shards import LoaderOptions, ShardImages, image_loader
from kd3.errors import Kd3Error
from kd3.models.spec import InputSpec
from kd3.progress import Progress


def pool_logits(model: torch.nn.Module, spec: InputSpec, num_classes: int, shards: list[Path],
                uid_to_row: dict[str, int], batch_size: int, workers: Union[int, LoaderOptions], device: torch.device,
                pixels: Optional[PoolPixels] = None, desc: str = "pool pass",
                progress: Optional[Progress] = None, split_by_rank: bool = False,
                compute: Optional[Compute] = None) -> torch.Tensor:
    """The model's logits on every (un-augmented) pool sample of ``uid_to_row``, in its row order
    [N, K]; images from the decoded-pixel cache when given. ``compute``: precision and memory format
    of the forwards (default: float32 on ``device``); ``workers``: the loader's worker count or options.

    With ``split_by_rank`` under torchrun (every rank calls it), each rank passes over its share of
    the shards and every rank gets all the logits. Progress lines are headed ``desc`` (batches), or
    the pass counts its samples into ``progress``."""
    compute = compute or Compute(device=device)
    model.eval()
    # made outside inference mode (filled in place inside it): a normal tensor the caller may modify
    logits = torch.full((len(uid_to_row), num_classes), float("nan"))
    if split_by_rank:
        shards = dist.rank_split(shards)
    loader = image_loader(ShardImages(shards, spec, uid_to_row=uid_to_row, pixels=pixels), batch_size, workers)
    if progress is None:
        loader = Progress(loader, desc, unit="batch", total=math.ceil(len(uid_to_row) / batch_size))
    # the logits only feed selections and metrics (nothing differentiates through them), and the
    # model is in eval mode (BatchNorm statistics are read, not updated): inference mode is safe
    with torch.inference_mode(), compute.autocast():
        for batch in loader:
            if progress is not None:
                progress.update(len(batch["row"]))
            logits[batch["row"]] = model(compute.images(batch["image"], spec)).float().cpu()
    if split_by_rank:
        logits = dist.merge_rows(logits)
    missing = torch.isnan(logits[:, 0])
    if missing.any():
        raise Kd3Error(f"{int(missing.sum())} scored samples could not be read back from the shards; "
                       "rerun `kd3 score --overwrite`")
    return logits


def batch_logits(model: torch.nn.Module, spec: InputSpec, images: torch.Tensor | list[torch.Tensor],
                 device: torch.device, compute: Optional[Compute] = None) -> torch.Tensor:
    """Logits [B, K] for a uint8 batch [B, C, H, W] or a list of uint8 [C, H, W] of any sizes
    (``compute``: precision and memory format; default float32 on ``device``)."""
    compute = compute or Compute(device=device)
    if isinstance(images, torch.Tensor):
        batch = prepare_uint8(images, spec)
    else:
        batch = torch.stack([prepare_uint8(image, spec) for image in images])
    with torch.inference_mode(), compute.autocast():
        logits = model(compute.images(batch, spec)).float().cpu()
    return logits.clone()  # out of inference mode: a normal tensor (callers may modify it in place)
