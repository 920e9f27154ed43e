"""`prepare` stage: build the offline mini benchmark, or download and lay out the real datasets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from msvlad.config import Params
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
    from msvlad.data.registry import prepare_dataset

    names = [params.data.train_set, params.data.val_set, *params.data.test_sets]
    for name in dict.fromkeys(n for n in names if n):
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
