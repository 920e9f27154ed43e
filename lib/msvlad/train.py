"""Training loop: mining rounds on a class-balanced pool, triplet steps, validation, exact resume.

One mining round: draw a class-balanced pool, describe it with the current network (eval, no
grad, training resolution), mine triplets, then take optimiser steps of `batch_triplets` triplets
until the round's triplets are used up; then a new round re-embeds a fresh pool (the paper's cache
refresh). Checkpoints hold the model, Adam, the step, the round, its remaining triplets and RNGs,
so a killed run resumes to the same weights as an uninterrupted one. Multi-GPU runs under `torchrun`
(DistributedDataParallel: pool description and each batch's triplets are split across ranks).
"""

from __future__ import annotations

import csv
import logging
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from msvlad.config import Params, params_to_dict
from msvlad.datasets import TrainingSet, load_dataset, load_training_set
from msvlad.extract import ImageItem, describe_images, load_resized
from msvlad.images import ImageLoadError
from msvlad.loss import triplet_loss
from msvlad.mining import build_miner
from msvlad.model import RetrievalNet, load_model, save_model
from msvlad.retrieval import describe_dataset, score
from msvlad.runlog import LOG_FIELDS, ROUND_FIELDS, TRIPLET_FIELDS
from msvlad.runtime import init_distributed, resolve_device, seed_everything
from msvlad.sampler import ClassBalancedPool
from msvlad.schedule import lr_at
from msvlad.storage import atomic_path, load_torch, save_torch

log = logging.getLogger(__name__)


class _Stop:
    """Turns SIGTERM/SIGINT into a graceful stop at the next step boundary (checkpoint first)."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            log.warning("signal %d: stopping after this step and writing a checkpoint", signum)
            self.requested = True

        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _append_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _truncate_csv(path: Path, column: str, limit: float) -> None:
    """Drop rows logged after the checkpoint being resumed (atomic rewrite)."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = [r for r in reader if float(r[column]) <= limit]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"]).astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_signature(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters a checkpoint must share with the run resuming it (the step budget may grow)."""
    sig = {k: params.get(k) for k in ("model", "miner", "train", "data")}
    sig["seed"] = params.get("base", {}).get("seed")
    if isinstance(sig["train"], dict):
        sig["train"] = {
            k: v
            for k, v in sig["train"].items()
            if k not in ("epochs", "checkpoint_every", "val_every")
        }
    return sig


class Trainer:
    """Holds everything a training run needs; `run()` trains until the step budget or a stop."""

    def __init__(
        self, params: Params, init_model: Path, out_dir: Path, device: torch.device | None = None
    ) -> None:
        self.params = params
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dist = init_distributed()
        self.device = device or resolve_device(params.base.device)
        if self.dist.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        seed_everything(params.base.seed)
        root = Path(params.data.root)
        self.train_set: TrainingSet = load_training_set(root / params.data.train_set)
        self.val_set = load_dataset(root, params.data.val_set) if params.data.val_set else None
        self.model: RetrievalNet = load_model(init_model).to(self.device)
        self.net: torch.nn.Module = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.frozen = params.train.frozen_stages
        trainable = self.model.freeze_stages(self.frozen)
        self.optimizer = torch.optim.Adam(trainable, lr=params.train.lr_start, weight_decay=0.0)
        self.trunk_cache: torch.Tensor | None = None
        m = params.miner
        self.pool = ClassBalancedPool(
            self.train_set.labels, m.pool_size, m.images_per_class, params.base.seed
        )
        self.step = 0
        self.round = 0
        self.round_triplets = torch.zeros(0, 3, dtype=torch.long)
        self.round_pos = 0
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.total_steps = params.train.epochs * params.train.steps_per_epoch
        self._epoch_loss: list[float] = []
        self._epoch_triplets = 0
        self._epoch_rounds: list[tuple[int, int]] = []
        self._t0 = time.time()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "round": self.round,
            "round_triplets": self.round_triplets,
            "round_pos": self.round_pos,
            "epoch_loss": torch.tensor(self._epoch_loss, dtype=torch.float64),
            "epoch_triplets": self._epoch_triplets,
            "epoch_rounds": torch.tensor(self._epoch_rounds, dtype=torch.long).reshape(-1, 2),
            "rng": _rng_state(),
            "params": params_to_dict(self.params),
        }

    def save_checkpoint(self) -> None:
        if self.dist.main:
            save_torch(self.checkpoint_path, self.state_dict())
            log.info("checkpoint at step %d -> %s", self.step, self.checkpoint_path)

    def resume(self) -> bool:
        """Load checkpoint.pt if present; logs written after it are cut back."""
        if not self.checkpoint_path.exists():
            return False
        state = load_torch(self.checkpoint_path, self.device)
        if _run_signature(state.get("params", {})) != _run_signature(params_to_dict(self.params)):
            stale = self.checkpoint_path.with_name("checkpoint.stale.pt")
            self.checkpoint_path.replace(stale)
            for name in ("log.csv", "rounds.csv", "triplets.csv"):
                (self.out_dir / name).unlink(missing_ok=True)
            log.warning(
                "%s was written with other parameters: moved to %s, training from scratch",
                self.checkpoint_path,
                stale.name,
            )
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.round = int(state["step"]), int(state["round"])
        self.round_triplets = state["round_triplets"].cpu()
        self.round_pos = int(state["round_pos"])
        self._epoch_loss = state["epoch_loss"].tolist()
        self._epoch_triplets = int(state["epoch_triplets"])
        self._epoch_rounds = [tuple(r) for r in state["epoch_rounds"].tolist()]
        _set_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state["rng"].items()})
        if self.dist.main:
            _truncate_csv(self.out_dir / "log.csv", "step", self.step)
            _truncate_csv(self.out_dir / "rounds.csv", "round", self.round)
            _truncate_csv(self.out_dir / "triplets.csv", "round", self.round)
        log.info(
            "resumed from %s at step %d (round %d)", self.checkpoint_path, self.step, self.round
        )
        return True

    # ------------------------------------------------------------------ frozen-trunk cache
    @torch.no_grad()
    def build_trunk_cache(self) -> None:
        """Frozen stages never change: compute their output for every training image once."""
        size, bs = self.params.model.image_size, self.params.extract.batch_size
        self.model.eval()
        chunks = []
        for start in tqdm(
            range(0, len(self.train_set.paths), bs), desc="train: frozen-trunk cache", leave=False
        ):
            batch = []
            for path in self.train_set.paths[start : start + bs]:
                try:
                    batch.append(load_resized(ImageItem(path), size, "square"))
                except ImageLoadError as err:
                    log.warning("frozen-trunk cache: %s (zero features)", err)
                    batch.append(torch.zeros(3, size, size))
            chunks.append(
                self.model.backbone.trunk(torch.stack(batch).to(self.device), self.frozen).cpu()
            )
        self.trunk_cache = torch.cat(chunks)
        log.info(
            "frozen-trunk cache: %d images, %s each, %.0f MB",
            len(self.trunk_cache),
            tuple(self.trunk_cache.shape[1:]),
            self.trunk_cache.numel() * 4 / 2**20,
        )

    @torch.no_grad()
    def _describe_cached(self, pool_idx: np.ndarray) -> torch.Tensor:
        self.model.eval()
        bs = self.params.extract.batch_size
        out = [
            self.model.forward_from(
                self.trunk_cache[pool_idx[i : i + bs]].to(self.device), self.frozen
            ).float()
            for i in range(0, len(pool_idx), bs)
        ]
        return torch.cat(out)

    # ------------------------------------------------------------------ mining
    def _describe_pool(self, pool_idx: np.ndarray) -> torch.Tensor:
        if self.trunk_cache is not None and self.dist.world == 1:
            return self._describe_cached(pool_idx)
        items = [ImageItem(self.train_set.paths[i]) for i in pool_idx]
        shard = np.array_split(np.arange(len(items)), self.dist.world)[self.dist.rank]
        desc, ok = describe_images(
            self.model,
            [items[i] for i in shard],
            image_size=self.params.model.image_size,
            batch_size=self.params.extract.batch_size,
            device=self.device,
            num_workers=self.params.base.num_workers,
            desc=f"round {self.round}: describe pool",
        )
        desc = desc.to(self.device)
        if self.dist.world > 1:
            sizes = [len(s) for s in np.array_split(np.arange(len(items)), self.dist.world)]
            parts = [torch.zeros(n, desc.shape[1], device=self.device) for n in sizes]
            padded = torch.zeros(max(sizes), desc.shape[1], device=self.device)
            padded[: len(desc)] = desc
            gathered = [torch.zeros_like(padded) for _ in sizes]
            dist.all_gather(gathered, padded)
            parts = [g[:n] for g, n in zip(gathered, sizes, strict=True)]
            desc = torch.cat(parts)
        return desc.float()

    def mine_round(self) -> None:
        """Draw the round's pool, embed it, mine triplets and log them."""
        m = self.params.miner
        pool_idx = self.pool.sample(self.round)
        t0 = time.time()
        desc = self._describe_pool(pool_idx)
        t1 = time.time()
        labels = torch.from_numpy(self.train_set.labels[pool_idx]).to(desc.device)
        miner = build_miner(
            m.name,
            margin=m.margin,
            delta=m.delta,
            threshold=m.threshold,
            semi_hard_prob=m.semi_hard_prob,
            triplets_per_round=m.triplets_per_round,
            seed=self.params.base.seed * 1_000_003 + self.round,
            backend=m.backend,
        )
        mined = miner.mine(desc, labels)
        t2 = time.time()
        idx = torch.from_numpy(pool_idx)
        self.round_triplets = torch.stack(
            [idx[mined.anchors.cpu()], idx[mined.positives.cpu()], idx[mined.negatives.cpu()]],
            dim=1,
        ).reshape(-1, 3)
        self.round_pos = 0
        frame = mined.to_frame()
        if self.dist.main:
            kinds = frame["kind"].value_counts() if len(frame) else {}
            _append_csv(
                self.out_dir / "rounds.csv",
                ROUND_FIELDS,
                [
                    {
                        "round": self.round,
                        "step": self.step,
                        "pool": len(pool_idx),
                        "candidates": getattr(mined, "num_candidates", len(frame)),
                        "triplets": len(frame),
                        "semi_hard": int(kinds.get("semi-hard", 0)),
                        "hard": int(kinds.get("hard", 0)),
                        "mean_loss": float(frame["loss"].mean()) if len(frame) else float("nan"),
                        "describe_seconds": round(t1 - t0, 3),
                        "mine_seconds": round(t2 - t1, 3),
                    }
                ],
            )
            rel = [str(Path(p).relative_to(self.train_set.root)) for p in self.train_set.paths]
            rows = []
            for r in frame.itertuples(index=False):
                a, p, n = (
                    int(pool_idx[r.anchor]),
                    int(pool_idx[r.positive]),
                    int(pool_idx[r.negative]),
                )
                rows.append(
                    {
                        "round": self.round,
                        "step": self.step,
                        "anchor": rel[a],
                        "positive": rel[p],
                        "negative": rel[n],
                        "anchor_label": self.train_set.classes[self.train_set.labels[a]],
                        "negative_label": self.train_set.classes[self.train_set.labels[n]],
                        "pos_rank": int(r.pos_rank),
                        "neg_rank": int(r.neg_rank),
                        "pos_sim": round(float(r.pos_sim), 6),
                        "neg_sim": round(float(r.neg_sim), 6),
                        "loss": round(float(r.loss), 6),
                        "kind": r.kind,
                    }
                )
            _append_csv(self.out_dir / "triplets.csv", TRIPLET_FIELDS, rows)
        self._epoch_rounds.append((self.round, len(frame)))
        log.info(
            "round %d: %d triplets mined from a pool of %d (%.1fs embed, %.2fs mine)",
            self.round,
            len(frame),
            len(pool_idx),
            t1 - t0,
            t2 - t1,
        )
        self.round += 1

    # ------------------------------------------------------------------ optimisation
    def _load_triplet(self, triplet: torch.Tensor) -> torch.Tensor | None:
        if self.trunk_cache is not None:
            return self.trunk_cache[triplet]
        size = self.params.model.image_size
        try:
            return torch.stack(
                [
                    load_resized(ImageItem(self.train_set.paths[i]), size, "square")
                    for i in triplet.tolist()
                ]
            )
        except ImageLoadError as err:
            log.warning("skipping triplet: %s", err)
            return None

    def train_step(self, triplets: torch.Tensor) -> float:
        """One optimiser step on (T, 3) dataset-index triplets, accumulated over micro-batches."""
        cfg = self.params.train
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.net.train()
        shard = triplets[self.dist.rank :: self.dist.world]
        images = [t for t in (self._load_triplet(tr) for tr in shard) if t is not None]
        total = len(triplets)
        use_amp = cfg.amp and self.device.type == "cuda"
        loss_sum = 0.0
        micro = [images[i : i + cfg.micro_batch] for i in range(0, len(images), cfg.micro_batch)]
        for j, chunk in enumerate(micro):
            x = torch.cat(chunk).to(
                self.device, non_blocking=True
            )  # (3m, 3, S, S): a, p, n interleaved
            sync = j == len(micro) - 1 or not isinstance(
                self.net, torch.nn.parallel.DistributedDataParallel
            )
            ctx = nullcontext() if sync else self.net.no_sync()
            with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                d = (
                    self.model.forward_from(x, self.frozen)
                    if self.trunk_cache is not None
                    else self.net(x)
                )
                d = d.float().view(len(chunk), 3, -1)
                loss = triplet_loss(d[:, 0], d[:, 1], d[:, 2], self.params.miner.margin)
                scaled = loss * len(chunk) / total * self.dist.world
            scaled.backward()
            loss_sum += loss.item() * len(chunk)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum / max(1, len(images))

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float:
        """Validation mAP (Medium for revisited sets) at one scale, raw descriptors."""
        if self.val_set is None:
            return float("nan")
        desc = describe_dataset(
            self.model,
            self.val_set,
            model_cfg=self.params.model,
            extract_cfg=self.params.extract,
            scales=[1.0],
            whiten=False,
            device=self.device,
            num_workers=self.params.base.num_workers,
        )
        metrics, _ = score(desc, self.val_set, self.params.evaluate)
        js = metrics.to_json()["mAP"]
        return float(js.get("medium", js.get("all", float("nan"))))

    def _log_epoch(self, val_map: float) -> None:
        cfg = self.params.train
        row = {
            "epoch": self.step // cfg.steps_per_epoch,
            "step": self.step,
            "lr": lr_at(max(0, self.step - 1), cfg),
            "loss": float(np.mean(self._epoch_loss)) if self._epoch_loss else float("nan"),
            "triplets": self._epoch_triplets,
            "rounds": len(self._epoch_rounds),
            "yield": float(np.mean([n for _, n in self._epoch_rounds]))
            if self._epoch_rounds
            else float("nan"),
            "val_map": round(val_map, 4),
            "seconds": round(time.time() - self._t0, 1),
        }
        if self.dist.main:
            _append_csv(self.out_dir / "log.csv", LOG_FIELDS, [row])
        log.info("epoch %(epoch)d step %(step)d: loss %(loss).4f, val mAP %(val_map).2f", row)
        self._epoch_loss, self._epoch_triplets, self._epoch_rounds = [], 0, []

    # ------------------------------------------------------------------ main loop
    def run(self, max_steps: int | None = None) -> Path:
        """Train to the configured steps (or `max_steps` more), checkpointing; returns model.pt."""
        cfg = self.params.train
        resumed = self.resume()
        if self.frozen and self.trunk_cache is None and self.dist.world == 1:
            self.build_trunk_cache()
        if not resumed and self.step == 0:
            self._log_epoch(self.validate())  # epoch 0: the k-means-initialised model
        stop_at = (
            self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        )
        stopper = _Stop()
        empty_rounds = 0
        bar = tqdm(
            total=stop_at, initial=self.step, desc="train", leave=False, disable=not self.dist.main
        )
        with stopper.installed():
            while self.step < stop_at and not stopper.requested:
                if self.round_pos >= len(self.round_triplets):
                    self.mine_round()
                    empty_rounds = 0 if len(self.round_triplets) else empty_rounds + 1
                    if empty_rounds >= 20:
                        raise RuntimeError(
                            "miner: 20 consecutive rounds without a triplet; widen miner.delta or "
                            "miner.threshold, or enlarge miner.pool_size"
                        )
                    continue
                batch = self.round_triplets[self.round_pos : self.round_pos + cfg.batch_triplets]
                self.round_pos += len(batch)
                loss = self.train_step(batch)
                self._epoch_loss.append(loss)
                self._epoch_triplets += len(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", round=self.round)
                if self.step % cfg.steps_per_epoch == 0:
                    epoch = self.step // cfg.steps_per_epoch
                    val = (
                        self.validate()
                        if cfg.val_every and epoch % cfg.val_every == 0
                        else float("nan")
                    )
                    self._log_epoch(val)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        final = self.out_dir / "model.pt"
        if self.step >= self.total_steps and self.dist.main:
            save_model(self.model, final, step=self.step)
            log.info("training done: %d steps -> %s", self.step, final)
        return final


def train(params: Params, init_model: Path, out_dir: Path, max_steps: int | None = None) -> Path:
    """Train from a (k-means-initialised) model file; resumes from out_dir/checkpoint.pt."""
    return Trainer(params, init_model, out_dir).run(max_steps)
