"""Uncertainty of mAP differences: paired bootstrap over queries.

With 70 queries (ROxf/RPar), mAP differences of 1-2 points are often noise. Both runs are
evaluated on the same queries, so queries are resampled jointly (paired) and the distribution of
the mean AP difference gives a confidence interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

_MAX_DRAWS_PER_CHUNK = 1 << 22  # resampled indices held at once (32 MiB of int64)


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of mAP(a) - mAP(b), in percent points.

    diff is the observed difference; ci_low/ci_high the percentile interval; p_value the
    fraction of resamples with a difference <= 0 (small = a is reliably better than b).
    """

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_queries: int
    n_boot: int
    ci: float

    def to_json(self) -> dict[str, float | int]:
        """Plain dict, differences rounded to 2 decimals as the mAP tables are."""
        out = asdict(self)
        for key in ("diff", "ci_low", "ci_high"):
            out[key] = round(out[key], 2)
        out["p_value"] = round(out["p_value"], 4)
        return out


def paired_bootstrap(
    ap_a: np.ndarray,
    ap_b: np.ndarray,
    *,
    n_boot: int = 10000,
    seed: int = 0,
    ci: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap CI of mAP(a) - mAP(b) from per-query APs in [0, 1] (NaN queries dropped)."""
    a = np.asarray(ap_a, dtype=np.float64)
    b = np.asarray(ap_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"ap_a, ap_b: expected two 1-D arrays of equal length, got {a.shape}, {b.shape}"
        )
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci: expected a level in (0, 1), got {ci!r}")
    valid = ~(np.isnan(a) | np.isnan(b))
    n = int(valid.sum())
    if n == 0:
        raise ValueError("ap_a, ap_b: no query has a finite AP in both runs")
    d = (a[valid] - b[valid]) * 100.0  # percent points per query
    n_boot = int(n_boot)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    rows = max(1, _MAX_DRAWS_PER_CHUNK // n)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n) resampled queries
        diffs[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return BootstrapResult(
        diff=float(d.mean()),
        ci_low=float(low),
        ci_high=float(high),
        p_value=float(np.mean(diffs <= 0.0)),
        n_queries=n,
        n_boot=n_boot,
        ci=float(ci),
    )
