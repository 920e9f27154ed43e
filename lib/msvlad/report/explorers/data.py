"""What `evaluate` wrote for the rankings explorer, loaded lazily and kept, and what follows.

`evaluate` writes the ranking of the plain descriptor only (`ranks.npy`); the +raw / +QE / +DBA
rankings are recomputed here from `features.npz` by the library's own `pipeline.score` (with the
method's own `evaluate.*` settings), so they are the rankings that `per_query_<variant>.csv`
scored. A clicked database image is ranked by the same search, QE and DBA functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import msvlad.report.explorers.ranking as ranking
from msvlad import paths
from msvlad.config import Params, method_params
from msvlad.report import results

if TYPE_CHECKING:
    from msvlad.data.testsets import RetrievalDataset

log = logging.getLogger(__name__)

VARIANT_LABELS: dict[str, str] = {
    "plain": "as evaluated",
    "raw": "+raw (unwhitened)",
    "qe": "+QE",
    "dba": "+DBA",
}
VARIANT_ARRAYS: dict[str, tuple[str, ...]] = {  # what features.npz must hold to rank a variant
    "plain": (),
    "raw": ("q_raw", "db_raw"),
    "qe": ("q", "db"),
    "dba": ("q", "db"),
}


class RunResults:
    """results/evaluate/<method>/<dataset>/ of the params' methods, loaded on first use."""

    def __init__(self, params: Params, results_dir: str | os.PathLike) -> None:
        self.params = params
        self.results_dir = Path(results_dir)
        self.data_root = paths.resolve(params.data.root)
        self._cache: dict[tuple, Any] = {}

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def datasets(self) -> list[str]:
        """Datasets some method has a ranking of: params' test sets first, then others by name."""
        found = {
            d.name
            for m in self.params.methods
            if (self.results_dir / m).is_dir()
            for d in (self.results_dir / m).iterdir()
            if (d / paths.RANKS).is_file()
        }
        listed = [d for d in self.params.data.test_sets if d in found]
        return listed + sorted(found - set(listed))

    def methods(self, dataset: str) -> list[str]:
        """Methods of params (in its order) with a ranking of `dataset`."""
        return [
            m
            for m in self.params.methods
            if (self.results_dir / m / dataset / paths.RANKS).is_file()
        ]

    def label(self, method: str) -> str:
        """The method's results-table label."""
        return self.params.methods[method].label

    def dataset(self, name: str) -> RetrievalDataset:
        """The test set (a "+distractors" suffix is dropped: its images are the same)."""
        from msvlad.data.testsets import load_dataset

        base = name.split("+", 1)[0]
        return self._memo(("dataset", base), lambda: load_dataset(self.data_root, base))

    def variants(self, method: str, dataset: str) -> list[str]:
        """Variants evaluate scored (per_query_<v>.csv) whose ranking features.npz can rebuild."""
        feats = self.features(method, dataset) or {}
        out = []
        for variant, arrays in VARIANT_ARRAYS.items():
            scored = (self.results_dir / method / dataset / paths.per_query_file(variant)).is_file()
            if scored and all(a in feats for a in arrays) and ("+" not in dataset or not arrays):
                out.append(variant)
        return out

    def ranks(self, method: str, dataset: str, variant: str = "plain") -> np.ndarray:
        """The (n_db, n_q) ranking: ranks.npy for plain, else rebuilt by `pipeline.score`."""
        if variant == "plain":
            return self._memo(
                ("ranks", method, dataset, variant),
                lambda: results.load_ranks(self.results_dir, method, dataset),
            )
        return self._memo(
            ("ranks", method, dataset, variant), lambda: self._score(method, dataset, variant)
        )

    def _score(self, method: str, dataset: str, variant: str) -> np.ndarray:
        from msvlad.evaluation.pipeline import score

        if variant not in self.variants(method, dataset):
            raise ValueError(
                f"variant: {variant!r} of {method} on {dataset} cannot be ranked from "
                f"{self.results_dir / method / dataset / paths.FEATURES} "
                f"(have {self.variants(method, dataset)})"
            )
        ds = self.dataset(dataset)
        _, ranks = score(
            self.descriptors(method, dataset), ds, self.evaluate_cfg(method), variant=variant
        )
        return np.asarray(ranks)

    def evaluate_cfg(self, method: str) -> Any:
        """The method's own `evaluate` settings (QE / DBA k and alpha, index)."""
        return method_params(self.params, method).evaluate

    def descriptors(self, method: str, dataset: str) -> Any:
        """features.npz as a `pipeline.DatasetDescriptors` (failed database images from metrics)."""
        from msvlad.evaluation.pipeline import DatasetDescriptors

        feats = self.features(method, dataset)
        if feats is None:
            raise FileNotFoundError(
                f"{self.results_dir / method / dataset / paths.FEATURES}: not found"
            )
        names = {n: i for i, n in enumerate(self.dataset(dataset).imlist)}
        failed = {
            names[f["name"]]: f.get("error", "")
            for f in self._failed(method, dataset)
            if f["name"] in names
        }
        return DatasetDescriptors(
            q=feats["q"],
            db=feats["db"],
            failed_queries={},
            failed_db=failed,
            q_raw=feats.get("q_raw"),
            db_raw=feats.get("db_raw"),
        )

    def _failed(self, method: str, dataset: str) -> list[dict[str, str]]:
        from msvlad.storage import read_json

        path = self.results_dir / method / dataset / paths.METRICS
        return list(read_json(path).get("failed_db", [])) if path.is_file() else []

    def per_query(
        self, method: str, dataset: str, setup: str, variant: str = "plain"
    ) -> pd.DataFrame:
        """per_query[_<variant>].csv of (method, dataset), one setup, AP in percent."""
        frame = self._memo(
            ("per_query", method, dataset, variant),
            lambda: results.load_per_query(self.results_dir, method, dataset, variant),
        )
        s = results.pick_setup(frame["setup"], setup)
        return frame[frame["setup"] == s].reset_index(drop=True)

    def features(self, method: str, dataset: str) -> dict[str, np.ndarray] | None:
        """features.npz (q, db and q_raw, db_raw if kept) of (method, dataset), or None."""

        def load() -> dict[str, np.ndarray] | None:
            from msvlad.storage import load_npz

            path = self.results_dir / method / dataset / paths.FEATURES
            try:
                feats = load_npz(path)
            except (OSError, ValueError) as err:
                log.info("%s: similarities and variants left out (%s)", path, err)
                return None
            if "q" not in feats or "db" not in feats:
                return None
            keep = ("q", "db", "q_raw", "db_raw")
            return {k: np.asarray(feats[k], dtype=np.float32) for k in keep if k in feats}

        return self._memo(("features", method, dataset), load)

    def vectors(
        self, method: str, dataset: str, variant: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(queries, database) as the variant ranks them: raw, DBA-expanded db or QE-expanded q."""
        return self._memo(
            ("vectors", method, dataset, variant), lambda: self._vectors(method, dataset, variant)
        )

    def _vectors(
        self, method: str, dataset: str, variant: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        from msvlad.evaluation.search import alpha_dba, alpha_qe

        feats = self.features(method, dataset)
        if feats is None or (variant != "plain" and variant not in self.variants(method, dataset)):
            return None
        cfg = self.evaluate_cfg(method)
        q, db = (feats["q_raw"], feats["db_raw"]) if variant == "raw" else (feats["q"], feats["db"])
        if variant == "dba":
            db = alpha_dba(db, k=cfg.dba_k, alpha=cfg.dba_alpha)
        if variant == "qe":
            first = self.ranks(method, dataset, "plain") if "+" not in dataset else None
            if first is not None and first.shape[0] >= cfg.qe_k:
                q = alpha_qe(q, db, first[: cfg.qe_k], k=cfg.qe_k, alpha=cfg.qe_alpha)
        return q, db

    def db_ranking(
        self, method: str, dataset: str, variant: str, db_index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A database image as the query: (ranking column, cosine per database image).

        Ranked as evaluate ranks a query: exact search, then alpha-QE for +QE; +DBA searches the
        DBA-expanded database.
        """
        from msvlad.evaluation.search import alpha_qe, search

        vecs = self.vectors(method, dataset, variant)
        if vecs is None:
            raise ValueError(
                f"{method} on {dataset}: no features.npz to rank a database image with"
            )
        _, db = vecs
        q = db[[int(db_index)]]
        column = search(q, db)[0][:, 0]
        if variant == "qe":
            cfg = self.evaluate_cfg(method)
            q = alpha_qe(q, db, column[: cfg.qe_k, None], k=cfg.qe_k, alpha=cfg.qe_alpha)
            column = search(q, db)[0][:, 0]
        return column, db.astype(np.float64) @ q[0].astype(np.float64)

    def query_sims(
        self, method: str, dataset: str, variant: str, query_index: int
    ) -> np.ndarray | None:
        """Cosine of a dataset query with every database image under the variant (None without)."""
        vecs = self.vectors(method, dataset, variant)
        if vecs is None or query_index >= len(vecs[0]):
            return None
        q, db = vecs
        return db.astype(np.float64) @ q[int(query_index)].astype(np.float64)

    def landmarks(self, dataset: str) -> ranking.Landmarks:
        """The dataset's landmarks (`ranking.landmarks`)."""
        return self._memo(("landmarks", dataset), lambda: ranking.landmarks(self.dataset(dataset)))

    def own_photos(self, dataset: str) -> list[frozenset[int]]:
        """Per query, its own photo among its junk (`ranking.own_photos`)."""
        return self._memo(("own", dataset), lambda: ranking.own_photos(self.dataset(dataset)))

    def truth(
        self, dataset: str, setup: str, query_index: int, from_db: bool = False
    ) -> ranking.QueryTruth:
        """Who is positive / junk / own photo for a dataset query or a clicked database image."""
        ds = self.dataset(dataset)
        if from_db:
            return ranking.landmark_truth(ds, self.landmarks(dataset), query_index)
        return ranking.dataset_truth(ds, query_index, setup, self.own_photos(dataset)[query_index])

    def embedding(
        self, method: str, dataset: str, variant: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """2-D PCA of the database descriptors (fit on them) and the queries projected alike."""

        def make() -> tuple[np.ndarray, np.ndarray] | None:
            from sklearn.decomposition import PCA

            vecs = self.vectors(method, dataset, variant)
            if vecs is None or len(vecs[1]) < 3:
                return None
            q, db = vecs
            pca = PCA(n_components=2, svd_solver="full").fit(db.astype(np.float64))
            return pca.transform(db.astype(np.float64)), pca.transform(q.astype(np.float64))

        return self._memo(("embedding", method, dataset, variant), make)
