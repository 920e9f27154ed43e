"""`prepare` stage: build the offline mini benchmark, or download and lay out the real datasets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from msvlad.config import Params
from msvlad.errors import InputError
from msvlad.storage import check_writable

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    """Mini profile: registry photos -> mini benchmark; paper profile: every dataset it names."""
    root = check_writable(Path(params.data.root))
    if params.base.profile == "mini":
        from msvlad.mini.assets import fetch_assets
        from msvlad.mini.builder import build_mini_benchmark

        fetch_assets(Path(params.data.assets))
        summary = build_mini_benchmark(
            Path(params.data.assets),
            root,
            seed=params.base.seed,
            image_max_side=params.prepare.mini_image_max_side,
            queries_per_scene=params.prepare.mini_queries_per_scene,
            views_per_scene=tuple(params.prepare.mini_scene_views),
            distractor_views=params.prepare.mini_distractor_views,
            train_views_per_class=params.prepare.mini_train_views,
        )
        log.debug("mini benchmark: %s", summary)  # also in <root>/manifest.json
        return
    from msvlad.data.official import prepare_dataset

    for name in _datasets_to_prepare(params, root):
        options: dict[str, Any] = {}
        if name.startswith("gldv2"):
            options = {
                "num_classes": params.prepare.gldv2_num_classes,
                "min_images_per_class": params.prepare.gldv2_min_images,
                "seed": params.base.seed,
            }
        if name == "holidays_rotated" and params.prepare.holidays_rotations:
            options = {"rotations": params.prepare.holidays_rotations}
        prepare_dataset(name, root, mirror=params.data.mirror, **options)


def _datasets_to_prepare(params: Params, root: Path) -> list[str]:
    """The registry datasets the params name, every one checked before the first download.

    A name outside the registry must already be laid out under the root by hand (any folder in
    revisitop layout is a dataset); holidays_rotated needs its rotation list.
    """
    from msvlad.data.catalog import DATASETS
    from msvlad.data.testsets import load_dataset, read_rotations
    from msvlad.data.trainsets import load_training_set

    keys = {params.data.train_set: "data.train_set", params.data.val_set: "data.val_set"}
    names = [params.data.train_set, params.data.val_set, *params.data.test_sets]
    todo = []
    for name in dict.fromkeys(n for n in names if n):
        if name in DATASETS:
            todo.append(name)
            continue
        try:
            if name == params.data.train_set:
                load_training_set(root / name)
            else:
                load_dataset(root, name)
        except (OSError, ValueError) as err:
            raise InputError(
                f"{keys.get(name, 'data.test_sets')}: {name!r} is no registry dataset "
                f"({', '.join(sorted(DATASETS))}) and {root / name} holds none ({err})"
            ) from None
        log.info("%s: laid out by hand in %s (not downloaded)", name, root / name)
    if "holidays_rotated" in todo:
        if not params.prepare.holidays_rotations:
            raise InputError(
                "prepare.holidays_rotations: holidays_rotated needs the list of Holidays images "
                "to turn upright (image name -> clockwise degrees); no official host publishes "
                "one (docs/reproduce.md)"
            )
        read_rotations(params.prepare.holidays_rotations)  # a bad list fails before downloads
    return todo
