"""Descriptor extraction: images -> (N, D) float32 descriptors, one row per image.

Multi-scale test-time extraction follows the paper: describe the image at each scale of the base
size, sum the raw L2 descriptors, L2, then PCA-whiten and L2. Images are batched: with the square
policy every image has the same size; with the aspect-preserving max-side policy images are bucketed
by their exact resized shape, so no padding changes a descriptor. An unreadable image does not stop
a long run: its row is zero and its index and error are returned, so the caller decides what that
means (evaluation names failed queries and database images; mining drops them from the pool).
`describe_multiscale` gives the raw multi-scale descriptor, `whiten_descriptors` whitens it: the
evaluation scores both from one extraction.
With `trunk_depth` > 0 (the frozen stages, `train.frozen_stages`) the output of the first
`trunk_depth` backbone stages is read from, or written to, the frozen-trunk cache
(`msvlad.nn.trunk_cache`): one entry per job (images, input size and policy, batches), so
the descriptors are bit-identical to the ones computed from the images, for every model that
shares those stages' weights.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from msvlad.config import MIN_IMAGE_SIZE, ResizeFilter
from msvlad.data.images import (
    ImageItem,
    ImageLoadError,
    ResizePolicy,
    clip_bbx,
    load_resized,
    target_size,
)
from msvlad.nn import functional as LF
from msvlad.nn.trunk_cache import open_job

log = logging.getLogger(__name__)


class _ImageSet(Dataset):
    def __init__(
        self,
        items: Sequence[ImageItem],
        size: int,
        policy: ResizePolicy,
        resize_filter: ResizeFilter = "bilinear",
    ) -> None:
        self.items, self.size, self.policy = items, size, policy
        self.resize_filter = resize_filter

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        """(image, index, "") or, for an unreadable image, (zero placeholder, index, its error)."""
        try:
            return load_resized(self.items[i], self.size, self.policy, self.resize_filter), i, ""
        except ImageLoadError as err:
            log.debug("unreadable image: %s", err)
            return torch.zeros(3, self.size, self.size), i, str(err)


def _batches(
    items: Sequence[ImageItem], size: int, policy: ResizePolicy, batch_size: int
) -> list[list[int]]:
    """Index batches whose images share one resized shape (aspect-aware bucketing)."""
    if policy == "square":
        idx = list(range(len(items)))
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        try:
            with Image.open(item.path) as im:
                w, h = im.size
            if item.bbx is not None:
                x1, y1, x2, y2 = clip_bbx(item.bbx, w, h)
                w, h = x2 - x1, y2 - y1
            if item.rotation in (90, 270):
                w, h = h, w
            shape = target_size(w, h, size, policy)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            shape = (size, size)  # unreadable: its own loader reports it
        buckets[shape].append(i)
    out = []
    for shape in sorted(buckets):
        idx = buckets[shape]
        out.extend(idx[i : i + batch_size] for i in range(0, len(idx), batch_size))
    return out


def _collate(
    batch: list[tuple[torch.Tensor, int, str]],
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    shapes = {t.shape for t, _, _ in batch}
    if len(shapes) > 1:  # a broken image's placeholder can differ in shape: pad to the largest
        h = max(s[1] for s in shapes)
        w = max(s[2] for s in shapes)
        batch = [
            (torch.nn.functional.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])), i, ok)
            for t, i, ok in batch
        ]
    return (
        torch.stack([t for t, _, _ in batch]),
        torch.tensor([i for _, i, _ in batch]),
        [err for _, _, err in batch],
    )


def _shard() -> tuple[int, int]:
    """(rank, world) of an initialised torchrun process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def describe_images(
    model: torch.nn.Module,
    items: Sequence[ImageItem],
    *,
    image_size: int,
    resize: ResizePolicy = "square",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: str = "extract",
    resize_filter: ResizeFilter = "bilinear",
    fp16: bool = True,
    failures: dict[int, str] | None = None,
    trunk_depth: int = 0,
) -> tuple[torch.Tensor, np.ndarray]:
    """Raw single-scale network outputs (N, raw_dim) on the CPU and a bool mask of loaded images.

    Under torchrun (an initialised process group) every rank embeds its own slice of `items` and
    the slices are gathered, so every rank gets all N rows: this is the one sharded path, used by
    evaluation, whitening and the training pool alike. Unreadable images get zero rows; with
    `failures` given, their index -> error is added to it.
    `fp16`: run the network under float16 autocast on CUDA (no effect on the CPU).
    `trunk_depth`: leading backbone stages whose output comes from the frozen-trunk cache.
    """
    rank, world = _shard()
    opts = (resize_filter, fp16, trunk_depth)
    errors: dict[int, str] = {}
    if world > 1:
        mine = np.array_split(np.arange(len(items)), world)[rank]
        desc, ok, local_errors = _describe_local(
            model,
            [items[i] for i in mine],
            image_size,
            resize,
            batch_size,
            device,
            num_workers,
            progress,
            *opts,
        )
        import torch.distributed as dist

        gathered: list = [None] * world
        local_errors = {int(mine[i]): e for i, e in local_errors.items()}
        dist.all_gather_object(gathered, (desc.numpy(), ok, local_errors))
        desc = torch.from_numpy(np.concatenate([g[0] for g in gathered]))
        ok = np.concatenate([g[1] for g in gathered])
        for g in gathered:
            errors.update(g[2])
    else:
        desc, ok, errors = _describe_local(
            model, items, image_size, resize, batch_size, device, num_workers, progress, *opts
        )
    if failures is not None:
        failures.update(errors)
    return desc, ok


def _describe_local(
    model: torch.nn.Module,
    items: Sequence[ImageItem],
    image_size: int,
    resize: ResizePolicy,
    batch_size: int,
    device: torch.device | str,
    num_workers: int,
    progress: str,
    resize_filter: ResizeFilter = "bilinear",
    fp16: bool = True,
    trunk_depth: int = 0,
) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
    model.eval()
    device = torch.device(device)
    out = torch.zeros(len(items), model.raw_dim)
    ok = np.zeros(len(items), dtype=bool)
    batches = _batches(items, image_size, resize, batch_size)
    use_amp = device.type == "cuda" and fp16
    job = open_job(
        model,
        trunk_depth,
        items,
        size=image_size,
        resize=resize,
        resize_filter=resize_filter,
        batch_size=batch_size,
        device=device,
        autocast=use_amp,
    )
    entry = None if job is None else job.cached
    if entry is not None and entry.ok.all() and len(entry.batches) == len(batches):
        for idx, prefix in zip(
            tqdm(batches, desc=progress, leave=False), entry.batches, strict=True
        ):
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                d = model.forward_from(prefix.to(device, non_blocking=True), job.depth)
            out[idx] = d.float().cpu()
        ok[:] = True
        return out, ok, {}
    loader = DataLoader(
        _ImageSet(items, image_size, resize, resize_filter),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        generator=torch.Generator(),  # its seed draw leaves the global RNG as a cache hit does
    )
    errors: dict[int, str] = {}
    for images, idx, errs in tqdm(loader, desc=progress, leave=False):
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            x = images.to(device, non_blocking=True)
            d = model(x) if job is None else model.forward_from(job.trunk(x), job.depth)
        out[idx] = d.float().cpu()
        ok[idx.numpy()] = [not e for e in errs]
        errors.update({int(i): e for i, e in zip(idx.tolist(), errs, strict=True) if e})
    if job is not None:  # a job with unreadable images is not kept (its errors name paths)
        job.finish(ok, store=entry is None and not errors)
    out[~torch.from_numpy(ok)] = 0.0
    return out, ok, errors


def describe_multiscale(
    model: torch.nn.Module,
    items: Sequence[ImageItem],
    *,
    image_size: int,
    scales: Sequence[float] = (1.0,),
    resize: ResizePolicy = "square",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: str = "extract",
    resize_filter: ResizeFilter = "bilinear",
    trunk_depth: int = 0,
) -> tuple[torch.Tensor, dict[int, str]]:
    """Raw multi-scale descriptors (N, raw_dim): L2 of the sum over scales; and failures.

    Each scale s describes the image at max(MIN_IMAGE_SIZE, round(image_size * s)). An image that
    fails at any scale gets a zero row and its index -> error in the returned dict.
    `trunk_depth`: leading backbone stages taken from the frozen-trunk cache (`describe_images`).
    """
    total = torch.zeros(len(items), model.raw_dim)
    failures: dict[int, str] = {}
    for s in scales:
        size = max(MIN_IMAGE_SIZE, round(image_size * s))
        d, _ = describe_images(
            model,
            items,
            image_size=size,
            resize=resize,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=f"{progress}@{size}",
            resize_filter=resize_filter,
            failures=failures,
            trunk_depth=trunk_depth,
        )
        total += d
    total = LF.l2n(total)
    total[sorted(failures)] = 0.0
    return total, failures


def whiten_descriptors(model: torch.nn.Module, raw: torch.Tensor) -> torch.Tensor | None:
    """The model's PCA-whitening (then L2) of raw descriptors; None if the model has none."""
    if getattr(model, "whitening", None) is None:
        return None
    return model.whiten(raw.to(next(model.parameters()).device)).cpu()


def describe_and_whiten(
    model: torch.nn.Module,
    items: Sequence[ImageItem],
    *,
    whiten: bool = True,
    **kwargs: Any,
) -> tuple[np.ndarray, list[int]]:
    """Descriptors (N, D) float32: multi-scale sum -> L2 -> whitening -> L2; and failed indices.

    `kwargs` are those of `describe_multiscale`; failed images have zero rows.
    """
    raw, failures = describe_multiscale(model, items, **kwargs)
    white = whiten_descriptors(model, raw) if whiten else None
    out = raw if white is None else white
    out[sorted(failures)] = 0.0
    if failures:
        shown = "; ".join(failures[i] for i in sorted(failures)[:3])
        log.warning("%d of %d images unreadable (zero rows): %s", len(failures), len(items), shown)
    return out.numpy().astype(np.float32), sorted(failures)
