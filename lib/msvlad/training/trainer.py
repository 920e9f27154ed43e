"""Training loop: mining rounds on a class-balanced pool, triplet steps, validation, exact resume.

One mining round: draw a class-balanced pool, describe it with the current network (eval, no
grad, training resolution), mine triplets, then take optimiser steps of `batch_triplets` triplets
until the round's triplets are used up; then a new round re-embeds a fresh pool (the paper's cache
refresh; with `miner.refresh_fraction` < 1 only part of it, the rest from the descriptor bank of
`msvlad.training.bank`). A pool image that cannot be read is dropped from its round (counted in
rounds.csv).
The run folder (`msvlad.training.rundir`) decides whether a run resumes, stops on other
parameters, or is moved aside; checkpoints (`msvlad.training.checkpoint`) make a run killed at any
point resume to the same weights and the same logs. SIGTERM/SIGINT write a checkpoint and stop.
The `fault_point` names (epoch0, mined, step, checkpoint, finish) are where the tests kill a run.
A run that diverges (a loss or weight becomes NaN or inf) stops at that step with one line; its
last checkpoint stays the last good state and no model.pt is written from it. model.pt is always
the model of the final checkpoint: one that disagrees (a run killed between the two) is rewritten.
Multi-GPU runs under `torchrun` (DistributedDataParallel: the pool description goes through the
sharded extraction path and each batch's triplets are split across ranks).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from msvlad.config import Params, TrainConfig
from msvlad.data.testsets import load_dataset
from msvlad.data.trainsets import TrainingSet, load_training_set
from msvlad.errors import CheckpointError, InputError
from msvlad.evaluation.pipeline import validation_map
from msvlad.mining.base import TripletMiner
from msvlad.mining.pool import ClassBalancedPool
from msvlad.mining.registry import miner_from_config
from msvlad.nn.loss import triplet_loss
from msvlad.nn.model import RetrievalNet, load_model, save_model
from msvlad.nn.pooling import optimizer_groups
from msvlad.paths import CHECKPOINT, MODEL
from msvlad.runtime import Dist, init_distributed, resolve_device, seed_everything
from msvlad.storage import atomic_path, file_digest, torch_bytes
from msvlad.training import logs
from msvlad.training.bank import DescriptorBank, describe_pool
from msvlad.training.checkpoint import (
    RunProgress,
    StopRequest,
    fault_point,
    restore_training_state,
    training_state,
)
from msvlad.training.inputs import TrainingInputs
from msvlad.training.rundir import Restart, locked, model_needs_writing, open_run
from msvlad.training.schedule import lr_at

log = logging.getLogger(__name__)

MAX_EMPTY_ROUNDS = 20  # consecutive rounds without a triplet before training gives up


class Trainer:
    """Holds everything a training run needs; `run()` trains until the step budget or a stop."""

    def __init__(
        self,
        params: Params,
        init_model: Path,
        out_dir: Path,
        device: torch.device | None = None,
        twins: Sequence[Path] = (),
    ) -> None:
        self.params, self.out_dir, self.twins = params, Path(out_dir), list(twins)
        self.init_digest = file_digest(init_model)
        self.dist = init_distributed()
        self.device = device or resolve_device(params.base.device)
        if self.dist.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        seed_everything(params.base.seed)
        root = Path(params.data.root)
        self.train_set: TrainingSet = load_training_set(root / params.data.train_set)
        self.val_set = load_dataset(root, params.data.val_set) if params.data.val_set else None
        self.model, self.net = load_network(init_model, params, self.device, self.dist)
        self.frozen = params.train.frozen_stages
        trainable = self.model.freeze_stages(self.frozen)
        groups = optimizer_groups(self.model, trainable)  # GeM's p at cirtorch's 10x lr
        self.optimizer = torch.optim.Adam(groups, lr=params.train.lr_start, weight_decay=0.0)
        self.inputs = TrainingInputs(self.model, self.train_set, params, self.device)
        self.pool, self.miner = make_pool(self.train_set, params), make_miner(params)
        self.bank = make_bank(self.train_set, params, self.dist.world)
        self.progress = RunProgress()
        self.total_steps = params.train.epochs * params.train.steps_per_epoch
        self._t0, self._empty_rounds = time.time(), 0
        self._saved_step: int | None = None  # the step of the last checkpoint written or loaded

    @property
    def step(self) -> int:
        """Optimiser steps taken so far."""
        return self.progress.step

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (`msvlad.training.checkpoint.training_state`)."""
        parts = (self.model, self.optimizer, self.miner, self.bank, self.progress)
        return training_state(*parts, self.params)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's weights, optimiser, miner, progress and RNGs (one that does not
        fit this run's network, frozen stages or miner is a `CheckpointError` naming the file)."""
        try:
            parts = (self.model, self.optimizer, self.miner, self.bank, self.progress)
            restore_training_state(state, *parts)
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as err:
            what = f"no {err}" if isinstance(err, KeyError) else " ".join(str(err).split())[:240]
            raise CheckpointError(
                f"{self.out_dir / CHECKPOINT}: does not fit this run's network, frozen stages "
                f"or miner ({what}); move the folder aside with --restart"
            ) from None
        self._saved_step = self.progress.step

    def save_checkpoint(self) -> None:
        """Write checkpoint.pt atomically (main rank)."""
        if self.dist.main:
            with atomic_path(self.out_dir / CHECKPOINT) as tmp:
                tmp.write_bytes(torch_bytes(self.state_dict()))
                fault_point("checkpoint")
            log.debug("checkpoint at step %d", self.progress.step)
        self._saved_step = self.progress.step

    def mine_round(self) -> None:
        """Draw the round's pool, describe it (bank, unreadable images dropped), mine, log."""
        p = self.progress
        pool_idx, t0 = self.pool.sample(p.round), time.time()
        self.inputs.failures = {}
        describe = partial(self.inputs.describe, progress=f"round {p.round}: pool")
        pool = describe_pool(self.bank, describe, pool_idx, p.step, self.device)
        if pool.failed and len(pool.pool_idx) < 2:
            example = next(iter(self.inputs.failures.values()), "")
            raise unreadable_pool(self.train_set.root, p.round, len(pool_idx), pool.failed, example)
        if not bool(torch.isfinite(pool.desc).all()):
            raise self._diverged(p.step, f"the pool descriptors of round {p.round} are NaN or inf")
        t1 = time.time()
        labels = torch.from_numpy(self.train_set.labels[pool.pool_idx]).to(pool.desc.device)
        mined = self.miner.mine(pool.desc, labels)
        seconds = (t1 - t0, time.time() - t1)
        idx = torch.from_numpy(pool.pool_idx)
        triplets = torch.stack([idx[t] for t in mined.as_tuple()], dim=1).reshape(-1, 3)
        if self.dist.main:
            args = (p.round, p.step, pool, mined.to_frame(), mined.num_candidates, seconds)
            logs.write_round(self.out_dir, *args, self.train_set)
        if pool.failed:
            log.warning("round %d: %d unreadable pool images dropped", p.round, pool.failed)
        self.progress.new_round(triplets)
        fault_point("mined")

    def train_step(self, triplets: torch.Tensor) -> float:
        """One optimiser step on (T, 3) dataset-index triplets, accumulated over micro-batches."""
        cfg = self.params.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.progress.step, cfg) * group.get("lr_scale", 1.0)
        self.net.train()
        shard = triplets[self.dist.rank :: self.dist.world]
        ids, images = self.inputs.triplets(shard)
        use_amp = cfg.amp and self.device.type == "cuda"
        ddp = isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
        loss_sum = 0.0
        m = cfg.micro_batch
        micro = [(images[i : i + m], ids[i : i + m]) for i in range(0, len(images), m)]
        for j, (chunk, chunk_ids) in enumerate(micro):
            x = torch.cat(chunk).to(self.device, non_blocking=True)  # (3m, 3, S, S): a, p, n
            sync = j == len(micro) - 1 or not ddp
            ctx = nullcontext() if sync else self.net.no_sync()
            with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                cached = self.inputs.trunk is not None
                d = self.model.forward_from(x, self.frozen) if cached else self.net(x)
                d = d.float().view(len(chunk), 3, -1)
                loss = triplet_loss(d[:, 0], d[:, 1], d[:, 2], self.params.miner.margin)
                scaled = loss * len(chunk) / len(triplets) * self.dist.world
            scaled.backward()
            loss_sum += loss.item() * len(chunk)
            self.bank.put_training(torch.stack(chunk_ids), d, self.progress.step)
        fault_point("step")
        try:
            self.optimizer.step()
        except RuntimeError as err:  # a rate beyond float32: Adam cannot even form its update
            if "overflow" not in str(err):
                raise
            cause = f"Adam's update overflows float32: {' '.join(str(err).split())}"
            raise self._diverged(self.progress.step + 1, cause) from None
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        if not math.isfinite(loss_sum) or not self._weights_finite():
            what = "loss" if not math.isfinite(loss_sum) else "weights"
            raise self._diverged(self.progress.step, f"its {what} became NaN or inf")
        return loss_sum / max(1, len(images))

    def _weights_finite(self) -> bool:
        """Every trainable weight is finite (one device sync)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())

    def _diverged(self, step: int, cause: str) -> InputError:
        """The error of a run that diverged at `step` (nothing of that step is saved)."""
        return diverged(self.out_dir, step, cause, self._saved_step, self.params.train)

    def validate(self) -> float:
        """Validation mAP (Medium for revisited sets) at one scale, raw descriptors."""
        if self.val_set is None:
            return float("nan")
        try:
            return validation_map(self.model, self.val_set, self.params, self.device)
        except ValueError as err:  # the search refuses non-finite descriptors
            if "NaN or inf" not in str(err):
                raise
            cause = "the validation descriptors are NaN or inf"
            raise self._diverged(self.progress.step, cause) from None

    def log_epoch(self, val_map: float) -> None:
        """Append the epoch's row to log.csv and reset the epoch accumulators."""
        cfg, p = self.params.train, self.progress
        head = (p.step // cfg.steps_per_epoch, p.step, lr_at(max(0, p.step - 1), cfg), p.epoch_loss)
        tail = (p.epoch_triplets, [n for _, n in p.epoch_rounds], val_map)
        row = logs.epoch_row(*head, *tail)
        if self.dist.main:
            logs.write_epoch(self.out_dir, row, time.time() - self._t0)
        log.debug("epoch %(epoch)d step %(step)d: loss %(loss).4f, val mAP %(val_map).2f", row)
        p.end_epoch()

    def run(self, max_steps: int | None = None, restart: Restart | None = None) -> Path:
        """Train to the configured steps (or `max_steps` more), checkpointing; returns model.pt."""
        stopper = StopRequest()
        with locked(self.out_dir) if self.dist.main else nullcontext(), stopper.installed():
            state = open_run(
                self.out_dir,
                self.params,
                restart,
                self.device,
                self.dist,
                init_digest=self.init_digest,
                twins=self.twins,
                restore=self.load_state_dict,
            )
            start = self.progress.step
            budget = self.total_steps if max_steps is None else start + max_steps
            stop_at = min(self.total_steps, budget)
            if start < stop_at:  # a finished run needs no cache
                self.inputs.cache_trunk(self.frozen if self.dist.world == 1 else 0)
            if state is None:
                self.log_epoch(self.validate())  # epoch 0: the k-means-initialised model
                fault_point("epoch0")
            with tqdm(  # closed on an error too: its one line starts a clean line
                total=stop_at, initial=start, desc="train", leave=False, disable=not self.dist.main
            ) as bar:
                while self.progress.step < stop_at and not stopper.requested:
                    self._advance(bar)
            if state is None or self.progress.step > start:
                self.save_checkpoint()
            fault_point("finish")
            final = self._finish(start)
        stopper.raise_if_requested(f"{self.out_dir}: at step {self.progress.step}")
        return final

    def _finish(self, start: int) -> Path:
        """Write model.pt once the budget is reached; one summary line."""
        final, p = self.out_dir / MODEL, self.progress
        done = p.step >= self.total_steps
        if (
            done
            and self.dist.main
            and (p.step > start or model_needs_writing(final, self.model.state_dict(), p.step))
        ):
            save_model(self.model, final, step=p.step)
        log.info(
            "train: steps %d -> %d of %d (%d rounds, %.0fs) -> %s",
            *(start, p.step, self.total_steps, p.round, time.time() - self._t0),
            final if done else self.out_dir / CHECKPOINT,
        )
        return final

    def _advance(self, bar: tqdm) -> None:
        """Mine a round if this one is used up, else take one step (with epoch and checkpoint)."""
        cfg, p = self.params.train, self.progress
        if p.round_done:
            self.mine_round()
            self._empty_rounds = 0 if len(p.round_triplets) else self._empty_rounds + 1
            if self._empty_rounds >= MAX_EMPTY_ROUNDS:
                raise InputError(
                    f"miner.delta: {MAX_EMPTY_ROUNDS} consecutive rounds without a triplet; "
                    "widen miner.delta or miner.threshold, or enlarge miner.pool_size"
                )
            return
        batch = p.next_batch(cfg.batch_triplets)
        loss = self.train_step(batch)
        p.epoch_loss.append(loss)
        p.epoch_triplets += len(batch)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", round=p.round)
        if p.step % cfg.steps_per_epoch == 0:
            epoch = p.step // cfg.steps_per_epoch
            validate = cfg.val_every and epoch % cfg.val_every == 0
            self.log_epoch(self.validate() if validate else float("nan"))
        if p.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()


def load_network(
    init_model: Path, params: Params, device: torch.device, dist: Dist
) -> tuple[RetrievalNet, torch.nn.Module]:
    """The model to train (finite weights checked) and the module the steps call (DDP under
    torchrun, else the model itself)."""
    model: RetrievalNet = load_model(init_model, expect=params.model).to(device)
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
        raise CheckpointError(f"{init_model}: holds NaN or inf weights")
    if dist.world == 1:
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def diverged(
    out_dir: Path, step: int, cause: str, saved_step: int | None, cfg: TrainConfig
) -> InputError:
    """The error of a run that diverged at `step` (nothing of that step is saved)."""
    kept = (
        f"{CHECKPOINT} keeps step {saved_step}"
        if saved_step is not None
        else "no checkpoint was written yet"
    )
    lr = lr_at(max(0, step - 1), cfg)
    return InputError(
        f"{out_dir}: training diverged at step {step} ({cause}; lr {lr:.3g}); {kept} "
        "and no model.pt is written; lower train.lr or train.lr_start and rerun with --restart"
    )


def unreadable_pool(
    root: Path, round_index: int, drawn: int, failed: int, example: str
) -> InputError:
    """The error of a round whose pool has fewer than 2 readable images."""
    return InputError(
        f"{root}: {failed} of the {drawn} training images drawn for round "
        f"{round_index} could not be read, too few are left to mine"
        + (f" (e.g. {example})" if example else "")
    )


def make_pool(train_set: TrainingSet, params: Params) -> ClassBalancedPool:
    """The class-balanced pool of the training set (a set too small for it is an input error)."""
    m = params.miner
    try:
        return ClassBalancedPool(
            train_set.labels,
            m.pool_size,
            m.images_per_class,
            params.base.seed,
            m.pool_classes,
            m.pool_draw,
            m.refresh_fraction if m.pool_draw == "rolling" else 1.0,
        )
    except ValueError as err:
        raise InputError(f"{train_set.root}: {err}") from None


def make_bank(train_set: TrainingSet, params: Params, world: int = 1) -> DescriptorBank:
    """The descriptor bank of amortised mining (it keeps nothing with refresh_fraction 1).

    Under torchrun each rank's training forward sees its own shard, so the steps do not update
    the bank there (the pool descriptors, gathered on every rank, still do).
    """
    m = params.miner
    return DescriptorBank(
        len(train_set.labels), m.refresh_fraction, m.pool_size, m.pool_precision, world == 1
    )


def make_miner(params: Params) -> TripletMiner:
    """The configured miner, seeded so round r draws from seed + r."""
    return miner_from_config(params.miner, seed=params.base.seed * 1_000_003)


def train(
    params: Params,
    init_model: Path,
    out_dir: Path,
    max_steps: int | None = None,
    restart: Restart | None = None,
    twins: Sequence[Path] = (),
) -> Path:
    """Train from a (k-means-initialised) model file; resumes from out_dir/checkpoint.pt, or
    copies a finished run of the same training from one of `twins` (msvlad.training.rundir)."""
    return Trainer(params, init_model, out_dir, twins=twins).run(max_steps, restart)
