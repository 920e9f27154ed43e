"""Training loop: mining rounds on a class-balanced pool, triplet steps, validation, exact resume.

One mining round: draw a class-balanced pool, describe it with the current network (eval, no
grad, training resolution), mine triplets, then take optimiser steps of `batch_triplets` triplets
until the round's triplets are used up; then a new round re-embeds a fresh pool (the paper's cache
refresh). Checkpoints (`msvlad.training.checkpoint`) make a killed run resume to the same weights.
Multi-GPU runs under `torchrun` (DistributedDataParallel: the pool description goes through the
sharded extraction path and each batch's triplets are split across ranks).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from msvlad.config import Params, params_to_dict
from msvlad.data.images import ImageItem, ImageLoadError, load_batch
from msvlad.data.testsets import load_dataset
from msvlad.data.trainsets import TrainingSet, load_training_set
from msvlad.evaluation.extract import embed_images
from msvlad.evaluation.pipeline import extract_dataset, score
from msvlad.mining.pool import ClassBalancedPool, at_pool_precision, pool_autocast_fp16
from msvlad.mining.registry import build_miner
from msvlad.nn.loss import triplet_loss
from msvlad.nn.model import RetrievalNet, load_model, save_model
from msvlad.runtime import init_distributed, resolve_device, seed_everything
from msvlad.storage import load_torch, save_torch
from msvlad.training import logs
from msvlad.training.checkpoint import StopRequest, rng_state, run_signature, set_rng_state
from msvlad.training.schedule import lr_at
from msvlad.training.trunk_cache import FrozenTrunkCache

log = logging.getLogger(__name__)

MAX_EMPTY_ROUNDS = 20  # consecutive rounds without a triplet before training gives up


class Trainer:
    """Holds everything a training run needs; `run()` trains until the step budget or a stop."""

    def __init__(
        self, params: Params, init_model: Path, out_dir: Path, device: torch.device | None = None
    ) -> None:
        self.params, self.out_dir = params, Path(out_dir)
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
        self.trunk: FrozenTrunkCache | None = None
        m = params.miner
        self.pool = ClassBalancedPool(
            self.train_set.labels, m.pool_size, m.images_per_class, params.base.seed, m.pool_classes
        )
        self.miner = build_miner(
            m.name,
            margin=m.margin,
            delta=m.delta,
            threshold=m.threshold,
            semi_hard_prob=m.semi_hard_prob,
            triplets_per_round=m.triplets_per_round,
            seed=params.base.seed * 1_000_003,  # round r draws from seed + r
            backend=m.backend,
        )
        self.step, self.round, self.round_pos = 0, 0, 0
        self.round_triplets = torch.zeros(0, 3, dtype=torch.long)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.total_steps = params.train.epochs * params.train.steps_per_epoch
        self._epoch_loss: list[float] = []
        self._epoch_triplets = 0
        self._epoch_rounds: list[tuple[int, int]] = []
        self._t0 = time.time()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (tensors and plain containers: weights_only loadable)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "miner": self.miner.state_dict(),
            "step": self.step,
            "round": self.round,
            "round_triplets": self.round_triplets,
            "round_pos": self.round_pos,
            "epoch_loss": torch.tensor(self._epoch_loss, dtype=torch.float64),
            "epoch_triplets": self._epoch_triplets,
            "epoch_rounds": torch.tensor(self._epoch_rounds, dtype=torch.long).reshape(-1, 2),
            "rng": rng_state(),
            "params": params_to_dict(self.params),
        }

    def save_checkpoint(self) -> None:
        """Write checkpoint.pt atomically (main rank)."""
        if self.dist.main:
            save_torch(self.checkpoint_path, self.state_dict())
            log.info("checkpoint at step %d -> %s", self.step, self.checkpoint_path)

    def resume(self) -> bool:
        """Load checkpoint.pt if present; logs written after it are cut back."""
        if not self.checkpoint_path.exists():
            return False
        state = load_torch(self.checkpoint_path, self.device)
        if run_signature(state.get("params", {})) != run_signature(params_to_dict(self.params)):
            stale = self.checkpoint_path.with_name("checkpoint.stale.pt")
            self.checkpoint_path.replace(stale)
            for name in ("log.csv", "rounds.csv", "triplets.csv", "neighbors.csv"):
                (self.out_dir / name).unlink(missing_ok=True)
            log.warning(
                "%s was written with other parameters: moved to %s, training from scratch",
                self.checkpoint_path,
                stale.name,
            )
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.miner.load_state_dict(state["miner"])
        self.step, self.round = int(state["step"]), int(state["round"])
        self.round_triplets = state["round_triplets"].cpu()
        self.round_pos = int(state["round_pos"])
        self._epoch_loss = state["epoch_loss"].tolist()
        self._epoch_triplets = int(state["epoch_triplets"])
        self._epoch_rounds = [tuple(r) for r in state["epoch_rounds"].tolist()]
        set_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state["rng"].items()})
        if self.dist.main:
            logs.truncate_csv(self.out_dir / "log.csv", "step", self.step)
            for name in ("rounds.csv", "triplets.csv", "neighbors.csv"):  # rounds < self.round
                logs.truncate_csv(self.out_dir / name, "round", self.round - 1)
        log.info(
            "resumed from %s at step %d (round %d)", self.checkpoint_path, self.step, self.round
        )
        return True

    # ------------------------------------------------------------------ mining
    def describe_pool(self, pool_idx: np.ndarray) -> torch.Tensor:
        """Raw descriptors of the pool images with the current network (cached trunk if any)."""
        precision = self.params.miner.pool_precision
        if self.trunk is not None:
            return at_pool_precision(self.trunk.describe(pool_idx), precision)
        desc, _ = embed_images(
            self.model,
            [ImageItem(self.train_set.paths[i]) for i in pool_idx],
            image_size=self.params.model.image_size,
            batch_size=self.params.extract.batch_size,
            device=self.device,
            num_workers=self.params.base.num_workers,
            progress=f"round {self.round}: describe pool",
            resize_filter=self.params.model.resize_filter,
            fp16=pool_autocast_fp16(precision),
        )
        return at_pool_precision(desc.to(self.device).float(), precision)

    def mine_round(self) -> None:
        """Draw the round's pool, embed it, mine triplets and log them."""
        pool_idx = self.pool.sample(self.round)
        t0 = time.time()
        desc = self.describe_pool(pool_idx)
        t1 = time.time()
        labels = torch.from_numpy(self.train_set.labels[pool_idx]).to(desc.device)
        mined = self.miner.mine(desc, labels)
        t2 = time.time()
        idx = torch.from_numpy(pool_idx)
        self.round_triplets = torch.stack([idx[t] for t in mined.as_tuple()], dim=1).reshape(-1, 3)
        self.round_pos = 0
        frame = mined.to_frame()
        if self.dist.main:
            row = logs.round_row(
                self.round, self.step, len(pool_idx), mined.num_candidates, frame, t1 - t0, t2 - t1
            )
            logs.append_csv(self.out_dir / "rounds.csv", logs.ROUND_FIELDS, [row])
            ts, names = self.train_set, self.train_set.names
            rows = logs.triplet_rows(
                self.round, self.step, frame, pool_idx, names, ts.labels, ts.classes
            )
            logs.append_csv(self.out_dir / "triplets.csv", logs.TRIPLET_FIELDS, rows)
            rows = logs.neighbor_rows(
                self.round, frame, desc, pool_idx, names, ts.labels, ts.classes
            )
            logs.append_csv(self.out_dir / "neighbors.csv", logs.NEIGHBOR_FIELDS, rows)
        self._epoch_rounds.append((self.round, len(frame)))
        log.info(
            "round %d: %d triplets mined from a pool of %d (%.1fs embed, %.2fs mine)",
            *(self.round, len(frame), len(pool_idx), t1 - t0, t2 - t1),
        )
        self.round += 1

    # ------------------------------------------------------------------ optimisation
    def _triplet_images(self, triplet: torch.Tensor) -> torch.Tensor | None:
        """The three images (or cached trunk outputs) of one triplet; None if one is unreadable."""
        if self.trunk is not None:
            return self.trunk[triplet]
        items = [ImageItem(self.train_set.paths[i]) for i in triplet.tolist()]
        try:
            size, resize_filter = self.params.model.image_size, self.params.model.resize_filter
            return load_batch(items, size, "square", resize_filter=resize_filter)[0]
        except ImageLoadError as err:
            log.warning("skipping triplet: %s", err)
            return None

    def train_step(self, triplets: torch.Tensor) -> float:
        """One optimiser step on (T, 3) dataset-index triplets, accumulated over micro-batches."""
        cfg = self.params.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.net.train()
        shard = triplets[self.dist.rank :: self.dist.world]
        images = [t for t in (self._triplet_images(tr) for tr in shard) if t is not None]
        use_amp = cfg.amp and self.device.type == "cuda"
        ddp = isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
        loss_sum = 0.0
        micro = [images[i : i + cfg.micro_batch] for i in range(0, len(images), cfg.micro_batch)]
        for j, chunk in enumerate(micro):
            x = torch.cat(chunk).to(self.device, non_blocking=True)  # (3m, 3, S, S): a, p, n
            sync = j == len(micro) - 1 or not ddp
            ctx = nullcontext() if sync else self.net.no_sync()
            with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                cached = self.trunk is not None
                d = self.model.forward_from(x, self.frozen) if cached else self.net(x)
                d = d.float().view(len(chunk), 3, -1)
                loss = triplet_loss(d[:, 0], d[:, 1], d[:, 2], self.params.miner.margin)
                scaled = loss * len(chunk) / len(triplets) * self.dist.world
            scaled.backward()
            loss_sum += loss.item() * len(chunk)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum / max(1, len(images))

    # ------------------------------------------------------------------ validation and logs
    @torch.no_grad()
    def validate(self) -> float:
        """Validation mAP (Medium for revisited sets) at one scale, raw descriptors."""
        if self.val_set is None:
            return float("nan")
        desc = extract_dataset(
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

    def log_epoch(self, val_map: float) -> None:
        """Append the epoch's row to log.csv and reset the epoch accumulators."""
        cfg = self.params.train
        row = logs.epoch_row(
            self.step // cfg.steps_per_epoch,
            self.step,
            lr_at(max(0, self.step - 1), cfg),
            self._epoch_loss,
            self._epoch_triplets,
            [n for _, n in self._epoch_rounds],
            val_map,
            time.time() - self._t0,
        )
        if self.dist.main:
            logs.append_csv(self.out_dir / "log.csv", logs.LOG_FIELDS, [row])
        log.info("epoch %(epoch)d step %(step)d: loss %(loss).4f, val mAP %(val_map).2f", row)
        self._epoch_loss, self._epoch_triplets, self._epoch_rounds = [], 0, []

    # ------------------------------------------------------------------ main loop
    def run(self, max_steps: int | None = None) -> Path:
        """Train to the configured steps (or `max_steps` more), checkpointing; returns model.pt."""
        resumed = self.resume()
        if self.frozen and self.trunk is None and self.dist.world == 1:
            self.trunk = FrozenTrunkCache(
                self.model,
                self.frozen,
                self.train_set.paths,
                image_size=self.params.model.image_size,
                batch_size=self.params.extract.batch_size,
                device=self.device,
                resize_filter=self.params.model.resize_filter,
            )
        if not resumed and self.step == 0:
            self.log_epoch(self.validate())  # epoch 0: the k-means-initialised model
        stop_at = self.total_steps if max_steps is None else self.step + max_steps
        stop_at = min(self.total_steps, stop_at)
        stopper = StopRequest()
        self._empty_rounds = 0
        bar = tqdm(
            total=stop_at, initial=self.step, desc="train", leave=False, disable=not self.dist.main
        )
        with stopper.installed():
            while self.step < stop_at and not stopper.requested:
                self._advance(bar)
        bar.close()
        self.save_checkpoint()
        final = self.out_dir / "model.pt"
        if self.step >= self.total_steps and self.dist.main:
            save_model(self.model, final, step=self.step)
            log.info("training done: %d steps -> %s", self.step, final)
        return final

    def _advance(self, bar: tqdm) -> None:
        """Mine a round if this one is used up, else take one step (with epoch and checkpoint)."""
        cfg = self.params.train
        if self.round_pos >= len(self.round_triplets):
            self.mine_round()
            self._empty_rounds = 0 if len(self.round_triplets) else self._empty_rounds + 1
            if self._empty_rounds >= MAX_EMPTY_ROUNDS:
                raise RuntimeError(
                    f"miner: {MAX_EMPTY_ROUNDS} consecutive rounds without a triplet; widen "
                    "miner.delta or miner.threshold, or enlarge miner.pool_size"
                )
            return
        batch = self.round_triplets[self.round_pos : self.round_pos + cfg.batch_triplets]
        self.round_pos += len(batch)
        loss = self.train_step(batch)
        self._epoch_loss.append(loss)
        self._epoch_triplets += len(batch)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", round=self.round)
        if self.step % cfg.steps_per_epoch == 0:
            epoch = self.step // cfg.steps_per_epoch
            validate = cfg.val_every and epoch % cfg.val_every == 0
            self.log_epoch(self.validate() if validate else float("nan"))
        if self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()


def train(params: Params, init_model: Path, out_dir: Path, max_steps: int | None = None) -> Path:
    """Train from a (k-means-initialised) model file; resumes from out_dir/checkpoint.pt."""
    return Trainer(params, init_model, out_dir).run(max_steps)
