"""`whiten` stage: PCA-whitening learned on single-scale training-set descriptors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from msvlad.config import ModelConfig, Params, model_config_from_dict
from msvlad.errors import InputError
from msvlad.storage import check_writable, load_torch, remove_stale_temps, write_bytes

if TYPE_CHECKING:
    from msvlad.nn.model import RetrievalNet

log = logging.getLogger(__name__)


def run_checkpoint(
    params: Params,
    checkpoint: Path,
    out: Path,
    fits: Callable[[ModelConfig], None] = lambda config: None,
) -> Path:
    """Whiten the model file `checkpoint` into `out`; `fits` checks its config against the params.

    With `whiten.dim` null a model file without whitening is copied byte for byte once its
    checksum and config are checked (no network is built and no image read: its weights are
    checked where it is used); otherwise the model is loaded and `run` learns the whitening.
    """
    if params.whiten.dim is None:
        state = load_torch(checkpoint)
        weights = state.get("state_dict") if isinstance(state, dict) else None
        plain = isinstance(weights, dict) and "config" in state  # else load_model says why
        if plain and not any(str(k).startswith("whitening.") for k in weights):
            fits(model_config_from_dict(state["config"], source=f"{checkpoint}: config"))
            check_writable(out.parent)
            remove_stale_temps(out.parent, out.name)  # left by a write a kill interrupted
            write_bytes(out, checkpoint.read_bytes())
            log.info("whiten.dim null: no whitening, the raw descriptor is kept -> %s", out)
            return out
    from msvlad.nn.model import load_model

    model = load_model(checkpoint)
    fits(model.config)
    return run(params, model, out)


def run(params: Params, model: RetrievalNet, out: Path) -> Path:
    """Describe `whiten.num_images` random training images, fit the whitening, save the model.

    The images are described as the model was trained (its own size and resize filter), the
    frozen stages' output coming from the frozen-trunk cache. With `whiten.dim` null the model is
    saved without whitening (its descriptor stays raw).
    """
    import numpy as np
    import torch

    from msvlad.data.images import ImageItem
    from msvlad.data.trainsets import load_training_set
    from msvlad.evaluation.extract import describe_images
    from msvlad.nn.model import save_model
    from msvlad.nn.whitening import Whitening
    from msvlad.runtime import resolve_device

    check_writable(out.parent)
    remove_stale_temps(out.parent, out.name)  # left by a write a kill interrupted
    if params.whiten.dim is None:
        model.whitening = None
        save_model(model.cpu(), out, whiten_images=0)
        log.info("whiten.dim null: no whitening, the raw descriptor is kept -> %s", out)
        return out
    device = resolve_device(params.base.device)
    model = model.to(device)
    train_set = load_training_set(Path(params.data.root) / params.data.train_set)
    rng = np.random.default_rng(params.base.seed)
    n = min(params.whiten.num_images, len(train_set.paths))
    pick = np.sort(rng.choice(len(train_set.paths), n, replace=False))
    desc, ok = describe_images(
        model,
        [ImageItem(train_set.paths[i]) for i in pick],
        image_size=model.config.image_size,
        batch_size=params.whiten.batch_size,
        device=device,
        num_workers=params.base.num_workers,
        progress="whiten",
        resize_filter=model.config.resize_filter,
        trunk_depth=params.train.frozen_stages,
    )
    desc = desc[torch.from_numpy(ok)]
    if len(desc) < 2:
        raise InputError(f"{train_set.root}: {len(desc)} readable training images; need 2+")
    dim = min(params.whiten.dim, desc.shape[1], len(desc) - 1)
    if dim < params.whiten.dim:
        log.warning(
            "whiten.dim=%d reduced to %d (descriptor dim %d, %d training images)",
            *(params.whiten.dim, dim, desc.shape[1], len(desc)),
        )
    model.whitening = Whitening.fit(desc, dim, params.whiten.power).to(device)
    save_model(model.cpu(), out, whiten_images=len(desc))
    log.info(
        "PCA-whitening %d -> %d learned on %d images -> %s", desc.shape[1], dim, len(desc), out
    )
    return out
