"""Frozen-trunk cache: the output of the leading backbone stages, computed once per content key.

With `train.frozen_stages = s > 0` the first s backbone stages keep their ImageNet weights, so
their output for an image never changes: training describes its pool and takes its steps from it
(`FrozenTrunkCache`), and every extraction (validation, whitening, evaluation, k-means's
sample) starts from it (`TrunkJob`), so the results-table rows that share those weights compute it
once per image and size. The paper profile fine-tunes everything (s = 0, no cache).

An entry is one extraction job, stored in one file of the store ($MSVLAD_CACHE/trunk or
~/.cache/msvlad/trunk), and its key is everything the stored tensors depend on (`TrunkKey`): the
backbone and the digest of the frozen stages' weights, the depth, the input policy (size, resize
mode and filter), the batch size, every image's content digest with its crop and rotation, in job
order, and the runtime (torch, Pillow and numpy versions, the device, threads, autocast, and a
digest of the code that decodes and runs the images). The batch composition is part of the key
because a convolution's float sums may depend on it: a job computed from the store gives exactly
the tensors, and so bit-identical descriptors, of the same job computed from the images.

Each file records its full key and a SHA-256 of its payload; both are checked on every read. A file
of another key (copied or renamed under this name), a damaged or truncated one, or one of another
format is never used: one warning line, and the job is computed again and the file rewritten. The
store keeps at most `MSVLAD_CACHE_MAX_GB` (default 4) gigabytes: the least recently used entries
are evicted first, and only files the store itself wrote (recognised by name and header) are ever
removed. `MSVLAD_CACHE_MAX_GB=0` turns the store off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msvlad.config import ResizeFilter
from msvlad.data.images import ImageItem
from msvlad.storage import atomic_path

if TYPE_CHECKING:
    import torch

    from msvlad.nn.model import RetrievalNet

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"MSVLAD-TRUNK\n"
NAME = re.compile(r"msvlad-trunk-[0-9a-f]{16}-[0-9a-f]{40}\.bin")  # all the store ever removes
STALE_TEMP = re.compile(r"\.msvlad-trunk-[0-9a-f]{16}-[0-9a-f]{40}\.bin\..+\.tmp")  # a cut write
MAX_HEADER = 64 << 20
DEFAULT_MAX_GB = 4.0
_DTYPES = {"float32": "<f4", "float16": "<f2"}  # torch dtype name -> stored numpy dtype
_TORCH = {v: k for k, v in _DTYPES.items()}
# the modules whose code decides the tensors of an entry (decoding, resizing, batching, stages)
_CODE = (
    "data/images.py",
    "nn/backbones.py",
    "nn/efficientnet_lite.py",
    "evaluation/extract.py",
    "nn/trunk_cache.py",
)


def trunk_store_dir() -> Path:
    """Where frozen-trunk caches are kept between runs: $MSVLAD_CACHE or ~/.cache/msvlad, /trunk."""
    root = (
        os.environ.get("MSVLAD_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msvlad"
    )
    return Path(root) / "trunk"


def max_store_bytes() -> int:
    """The store's size cap from $MSVLAD_CACHE_MAX_GB (default 4; 0 turns the store off)."""
    raw = os.environ.get("MSVLAD_CACHE_MAX_GB", "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_MAX_GB
    except ValueError:
        log.warning("MSVLAD_CACHE_MAX_GB=%r is not a number: %g used", raw, DEFAULT_MAX_GB)
        gb = DEFAULT_MAX_GB
    return max(0, int(gb * 2**30))


# ------------------------------------------------------------------------------------------ keys


@dataclass(frozen=True)
class TrunkKey:
    """Everything an entry's tensors depend on; `record()` is what its file stores and checks."""

    backbone: str
    depth: int  # backbone stages run (the frozen prefix)
    weights: str  # sha256 of those stages' state (names, dtypes, shapes, bytes)
    size: int  # the resize target (square side or longer side)
    resize: str  # square | max_side
    resize_filter: str
    batch_size: int
    images: tuple[str, ...]  # per image, in job order: "<sha256 of the file>|<bbx>|<rotation>"
    runtime: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The key as plain JSON values (what an entry records and a read compares)."""
        return {**asdict(self), "images": list(self.images), "format": FORMAT}

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON record (the entry's file name holds 40 hex digits)."""
        text = json.dumps(self.record(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(model: RetrievalNet, depth: int) -> str:
    """SHA-256 of the first `depth` backbone stages' state (they must be frozen to share it)."""
    import torch

    h = hashlib.sha256(f"{model.backbone.name}|{depth}".encode())
    for i, stage in enumerate(model.backbone.stages[:depth]):
        for name, tensor in stage.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_digest(item: ImageItem) -> str:
    """An image's content digest with its crop and rotation (an unreadable file: why)."""
    try:
        with Path(item.path).open("rb") as fh:
            content = hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as err:
        content = f"unreadable:{type(err).__name__}"
    bbx = "" if item.bbx is None else ",".join(repr(float(v)) for v in item.bbx)
    return f"{content}|{bbx}|{item.rotation}"


@cache
def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _CODE:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()


def runtime_record(device: torch.device, autocast: bool) -> dict[str, Any]:
    """What else decides the float results: library versions, device, threads, autocast, code."""
    import PIL
    import torch

    return {
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "device": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "autocast": bool(autocast),
        "code": _code_digest(),
    }


def job_key(
    model: RetrievalNet,
    depth: int,
    items: Sequence[ImageItem],
    *,
    size: int,
    resize: str,
    resize_filter: ResizeFilter,
    batch_size: int,
    device: torch.device,
    autocast: bool = False,
) -> TrunkKey:
    """The key of describing `items` with the first `depth` stages of `model`, so batched."""
    return TrunkKey(
        backbone=model.backbone.name,
        depth=depth,
        weights=weights_digest(model, depth),
        size=size,
        resize=resize,
        resize_filter=resize_filter,
        batch_size=batch_size,
        images=tuple(image_digest(item) for item in items),
        runtime=runtime_record(device, autocast),
    )


# ----------------------------------------------------------------------------------------- store


@dataclass
class TrunkEntry:
    """A stored job: the trunk output of every batch, in job order, and which images loaded."""

    batches: list[torch.Tensor]  # (B, C, H, W) per batch, with the strides they were made with
    ok: np.ndarray  # (N,) bool


class TrunkStore:
    """Entry files in one folder, verified on read, capped in size (least recently used out)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes

    @classmethod
    def default(cls) -> TrunkStore | None:
        """The store of $MSVLAD_CACHE with its cap; None when the cap is 0 (store off)."""
        cap = max_store_bytes()
        return cls(trunk_store_dir(), cap) if cap > 0 else None

    def path(self, key: TrunkKey) -> Path:
        """The file of a key: 16 hex digits of its weights digest, 40 of the key's digest."""
        return self.root / f"msvlad-trunk-{key.weights[:16]}-{key.digest[:40]}.bin"

    def knows(self, weights: str) -> bool:
        """Whether an entry of these stage weights is stored (a backbone rows share)."""
        if not self.root.is_dir():
            return False
        prefix = f"msvlad-trunk-{weights[:16]}-"
        return any(p.name.startswith(prefix) for p in self.entries())

    def get(self, key: TrunkKey) -> TrunkEntry | None:
        """The entry of `key`, or None (absent; or unusable: one warning, never used)."""
        file = self.path(key)
        try:
            entry = _read(file, key.record())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            log.warning("frozen-trunk cache %s: %s; recomputed", file, err)
            return None
        try:
            os.utime(file)  # recently used: evicted last
        except OSError:
            pass
        return entry

    def put(self, key: TrunkKey, batches: Sequence[torch.Tensor], ok: np.ndarray) -> Path | None:
        """Write an entry atomically and evict the oldest others above the cap; its path."""
        kept = [_to_memory(t) for t in batches]
        if any(k is None for k in kept):
            return None  # a dtype the format does not hold: not cached
        arrays = [k[0] for k in kept]
        size = sum(a.nbytes for a in arrays)
        if size > self.max_bytes:
            log.info("frozen-trunk cache: a %d MB job exceeds the cap, not stored", size >> 20)
            return None
        payload = hashlib.sha256()
        for a in arrays:
            payload.update(memoryview(a).cast("B"))
        header = {
            "format": FORMAT,
            "key": key.record(),
            "arrays": [
                [a.dtype.str, list(t.shape), k[1]]
                for a, t, k in zip(arrays, batches, kept, strict=True)
            ],
            "ok": np.asarray(ok, dtype=bool).astype(int).tolist(),
            "payload_bytes": size,
            "payload_sha256": payload.hexdigest(),
        }
        blob = json.dumps(header, sort_keys=True).encode()
        file = self.path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(file) as tmp, tmp.open("wb") as fh:
                fh.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
                for a in arrays:
                    fh.write(memoryview(a).cast("B"))
        except OSError as err:  # a full or read-only cache never stops the work
            log.warning("frozen-trunk cache %s: not written (%s)", file, err)
            return None
        self.evict(keep=file)
        return file

    def entries(self) -> list[Path]:
        """The files this store wrote (name and header); anything else is left alone."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.iterdir():
            if NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                try:
                    with path.open("rb") as fh:
                        if fh.read(len(MAGIC)) == MAGIC:
                            out.append(path)
                except OSError:
                    continue
        return out

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used entries until the store fits its cap; the removed."""
        removed = []
        now = time.time()
        for path in self.root.iterdir() if self.root.is_dir() else []:
            if STALE_TEMP.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                try:
                    if now - path.stat().st_mtime > 3600:  # surely not a write in progress
                        path.unlink()
                        removed.append(path)
                except OSError:
                    pass
        stats = []
        for path in self.entries():
            try:
                st = path.stat()
            except OSError:
                continue
            stats.append((st.st_mtime, path.name, path, st.st_size))
        total = sum(s[3] for s in stats)
        for _, _, path, size in sorted(stats):
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
            except OSError:
                continue
            total -= size
            removed.append(path)
            log.debug("frozen-trunk cache: evicted %s", path)
        return removed


def _to_memory(t: torch.Tensor) -> tuple[np.ndarray, list[int]] | None:
    """A tensor's elements in its own memory order and its strides (None: a dtype not kept).

    The exact strides come back on read, so the later stages see the very layout they would
    have seen (a kernel may choose its summation order by the strides).
    """
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        return None
    t = t.detach().cpu()
    shape, strides = list(t.shape), list(t.stride())
    span = sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) + 1
    if min(strides, default=1) < 0 or span != t.numel():  # not dense: keep it contiguous
        t = t.contiguous()
        strides = list(t.stride())
    order = sorted(range(t.dim()), key=lambda d: -strides[d])  # outermost dimension first
    return np.ascontiguousarray(t.permute(order).numpy()).reshape(-1), strides


def _read(file: Path, expected: dict[str, Any]) -> TrunkEntry:
    """Read and verify one entry file (magic, format, full key, sizes, payload digest)."""
    import torch

    with file.open("rb") as fh:
        data = fh.read()
    if not data.startswith(MAGIC):
        raise ValueError("not a frozen-trunk cache file (wrong header)")
    start = len(MAGIC) + 8
    if len(data) < start:
        raise ValueError("truncated")
    (n,) = struct.unpack_from("<Q", data, len(MAGIC))
    if n > MAX_HEADER or start + n > len(data):
        raise ValueError("truncated or damaged header")
    try:
        header = json.loads(bytes(data[start : start + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("damaged header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"another format ({header.get('format')!r}, this one reads {FORMAT})")
    if header.get("key") != expected:
        diff = sorted(k for k in expected if header["key"].get(k) != expected[k])
        raise ValueError(f"made for another key (differs in {', '.join(diff) or 'fields'})")
    body = memoryview(data)[start + n :]
    if len(body) != header["payload_bytes"]:
        raise ValueError(f"truncated ({len(body)} of {header['payload_bytes']} payload bytes)")
    if hashlib.sha256(body).hexdigest() != header["payload_sha256"]:
        raise ValueError("damaged (payload checksum mismatch)")
    batches, offset = [], 0
    for dtype, shape, strides in header["arrays"]:
        if dtype not in _DTYPES.values() or len(shape) != 4 or len(strides) != 4:
            raise ValueError(f"damaged (array {dtype} {shape} {strides})")
        count = int(np.prod(shape))
        if sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) + 1 != count:
            raise ValueError(f"damaged (strides {strides} of {shape})")
        flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        offset += flat.nbytes
        # into memory torch allocates (aligned as a computed tensor: vectorised kernels sum
        # unaligned data in another order), with the strides it was made with
        own = torch.empty(count, dtype=getattr(torch, _TORCH[dtype]))
        own.numpy()[:] = flat
        batches.append(torch.as_strided(own, shape, strides))
    if offset != len(body):
        raise ValueError("damaged (arrays do not fill the payload)")
    ok = np.asarray(header["ok"], dtype=bool)
    if len(ok) != len(expected["images"]):
        raise ValueError("damaged (image count)")
    return TrunkEntry(batches, ok)


# ------------------------------------------------------------------------------- one job, cached


class TrunkJob:
    """One extraction job's trunk output at `depth` stages: stored, extended, or computed.

    On a hit `cached` holds the stored batches. Otherwise, when the job is stored at the shallower
    `base` depth (the frozen stages every row shares), `cached` is that entry carried through the
    stages in between, and stored. Otherwise `cached` is None: the caller loads the images of each
    batch (the same batches, in order), takes `trunk(images)`, and `finish()` stores both depths.
    """

    def __init__(
        self,
        model: RetrievalNet,
        depth: int,
        key: TrunkKey,
        store: TrunkStore,
        base: int = 0,
        base_key: TrunkKey | None = None,
    ) -> None:
        self.model, self.depth, self.key, self.store = model, depth, key, store
        self.base, self.base_key = (base, base_key) if base_key is not None else (0, None)
        self._computed: list[torch.Tensor] = []
        self._base_computed: list[torch.Tensor] = []
        self.cached = self._get(key)
        if self.cached is None and self.base_key is not None:
            below = self._get(self.base_key)
            if below is not None and below.ok.all():
                self.cached = self._extend(below)

    def _get(self, key: TrunkKey) -> TrunkEntry | None:
        entry = _MEMO.get(key.digest) or self.store.get(key)
        if entry is not None:
            _remember(key.digest, entry)
        return entry

    def _put(self, key: TrunkKey, entry: TrunkEntry) -> None:
        _remember(key.digest, entry)
        self.store.put(key, entry.batches, entry.ok)

    def _extend(self, below: TrunkEntry) -> TrunkEntry:
        """The stored base-depth batches carried through stages [base, depth)."""
        import torch

        device = torch.device(self.key.runtime.get("device", "cpu"))
        autocast = bool(self.key.runtime.get("autocast"))
        self.model.eval()
        batches = []
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.float16, enabled=autocast),
        ):
            for b in below.batches:
                x = b.to(device, non_blocking=True)
                batches.append(self.model.backbone.forward_stages(x, self.base, self.depth).cpu())
        entry = TrunkEntry(batches, below.ok.copy())
        self._put(self.key, entry)
        return entry

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk output of a batch of images (both depths are kept for the store)."""
        backbone = self.model.backbone
        if self.base_key is None:
            out = backbone.trunk(images, self.depth)
        else:
            below = backbone.trunk(images, self.base)
            self._base_computed.append(below.detach().cpu())
            out = backbone.forward_stages(below, self.base, self.depth)
        self._computed.append(out.detach().cpu())
        return out

    def finish(self, ok: np.ndarray, store: bool = True) -> None:
        """Store what `trunk` computed (`store` False, e.g. an image failed: keep nothing)."""
        if self.cached is None and store and self._computed:
            ok = np.asarray(ok, dtype=bool)
            if self.base_key is not None:
                self._put(self.base_key, TrunkEntry(self._base_computed, ok))
            self._put(self.key, TrunkEntry(self._computed, ok))
        self._computed, self._base_computed = [], []


# the last entries read or written by this process (validation reads its jobs every epoch)
_MEMO: dict[str, TrunkEntry] = {}
_MEMO_MAX_BYTES = 512 << 20


def _remember(digest: str, entry: TrunkEntry) -> None:
    _MEMO.pop(digest, None)
    _MEMO[digest] = entry
    while len(_MEMO) > 1 and sum(_nbytes(e) for e in _MEMO.values()) > _MEMO_MAX_BYTES:
        _MEMO.pop(next(iter(_MEMO)))


def _nbytes(entry: TrunkEntry) -> int:
    return sum(b.numel() * b.element_size() for b in entry.batches)


def open_job(
    model: torch.nn.Module,
    frozen: int,
    items: Sequence[ImageItem],
    *,
    whole: bool = False,
    **key_args: Any,
) -> TrunkJob | None:
    """The cached trunk job of describing `items` (key_args: those of `job_key` but depth).

    `frozen`: the leading stages every model of the run keeps at their pretrained weights (0: no
    cache). A network whose whole backbone is such a shared one (`whole`, k-means's
    freshly built network; or one whose every stage's weights already key a stored entry: an
    off-the-shelf row) caches its whole trunk, on top of the frozen stages' entry; any other (a
    trained one) caches the frozen stages. None when nothing is cached (no stages, the store off).
    """
    backbone = getattr(model, "backbone", None)
    stages = getattr(backbone, "num_stages", 0)
    if frozen <= 0 or frozen > stages or not items:
        return None
    store = TrunkStore.default()
    if store is None:
        return None
    depth, base = frozen, 0
    if frozen < stages and (whole or store.knows(weights_digest(model, stages))):
        depth, base = stages, frozen
    key = job_key(model, depth, items, **key_args)
    base_key = (
        dataclasses.replace(key, depth=base, weights=weights_digest(model, base)) if base else None
    )
    return TrunkJob(model, depth, key, store, base, base_key)


# ---------------------------------------------------------------------------- training's cache


class FrozenTrunkCache:
    """Per-image outputs of the first `stages` backbone stages, at the training resolution.

    Every training image is described once (square, `image_size`, batches of `batch_size` in
    path order, an unreadable image as a zero image and remembered as such), from the store when
    `store` is given and holds the job.
    """

    def __init__(
        self,
        model: RetrievalNet,
        stages: int,
        paths: Sequence[Path],
        *,
        image_size: int,
        batch_size: int,
        device: torch.device,
        resize_filter: ResizeFilter = "bilinear",
        store: Path | TrunkStore | None = None,
    ) -> None:
        self.model, self.stages, self.device, self.batch_size = model, stages, device, batch_size
        self.resize_filter = resize_filter
        items = [ImageItem(Path(p)) for p in paths]
        self.ok = np.zeros(len(paths), dtype=bool)  # images that could be read
        if isinstance(store, Path):
            store = TrunkStore(store, max_store_bytes() or 2**62)
        key = job_key(
            model,
            stages,
            items,
            size=image_size,
            resize="square",
            resize_filter=resize_filter,
            batch_size=batch_size,
            device=device,
        )
        entry = store.get(key) if store is not None else None
        if entry is not None:
            self.features, self.ok = _concat(entry.batches), entry.ok.copy()
            log.info("frozen-trunk cache: %d images from %s", len(paths), store.path(key))
            return
        batches = self._build(items, image_size)
        self.features = _concat(batches)
        if store is not None:
            store.put(key, batches, self.ok)

    def _build(self, items: Sequence[ImageItem], size: int) -> list[torch.Tensor]:
        import torch
        from tqdm import tqdm

        from msvlad.data.images import load_batch

        self.model.eval()
        chunks = []
        bs = self.batch_size
        with torch.no_grad():
            for start in tqdm(range(0, len(items), bs), desc="frozen-trunk cache", leave=False):
                batch, ok = load_batch(
                    items[start : start + bs], size, "square", "zero", self.resize_filter
                )
                self.ok[start : start + bs] = ok
                trunk = self.model.backbone.trunk(batch.to(self.device), self.stages)
                chunks.append(trunk.cpu())
        return chunks

    def __getitem__(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Cached trunk outputs of the images at `index`."""
        return self.features[index]

    def describe(self, index: np.ndarray) -> torch.Tensor:
        """Raw descriptors (N, raw_dim) of the images at `index`, from their cached trunk."""
        import torch

        self.model.eval()
        bs = self.batch_size
        with torch.no_grad():
            out = [
                self.model.forward_from(
                    self.features[index[i : i + bs]].to(self.device), self.stages
                ).float()
                for i in range(0, len(index), bs)
            ]
        return torch.cat(out)


def _concat(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat(list(batches)) if batches else torch.zeros(0)
