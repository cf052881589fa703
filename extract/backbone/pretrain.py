"""Text-free diffusion pretraining of an ADM: noise-prediction loss (+ the VLB term when sigma is learned), EMA, resume.

The loop follows guided-diffusion's training where it matters for the weights: uniform
timesteps, the simple eps-MSE loss plus, for models that learn their variance, the variational
bound term on a stop-gradient mean (the "hybrid" objective); Adam with a linear warm-up,
gradient clipping and an exponential moving average of the weights, which is what gets probed.
Labels are never read.

Every random draw of a step (which images, flips, timesteps, noise) comes from a generator
seeded by (seed, step), and the batch order of an epoch from (seed, epoch), so a run killed and
resumed from its last checkpoint ends with the same weights, bit for bit on a CPU, as a run
straight through. Checkpoints are plain state dicts with the official parameter names
(``ema.pt`` and ``model.pt``, loadable by ``--checkpoint``), each with a JSON of its provenance.
``train_state.pt`` holds tensors and plain values only and loads with ``weights_only=True``; it records
the recipe and the data (dataset, split, limit, image count), and a resume with either changed is
refused. A Ctrl-C becomes one line saying which step's checkpoint is kept (``RunInterrupted``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from extract import distributed
from extract.backbone.checkpoint import load_tensors
from extract.backbone.configs import get_config
from extract.backbone.diffusion_loss import diffusion_loss
from extract.backbone.registry import create_backbone
from extract.errors import CheckpointError, ConfigError, RunInterrupted
from extract.inputs.images import load_batch
from extract.inputs.read_ahead import read_ahead
from extract.precision import autocast
from extract.schedule import get_schedule

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "STATE_NAME", "EMA_NAME", "MODEL_NAME", "LOSS_CSV"]

log = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
EMA_NAME = "ema.pt"
MODEL_NAME = "model.pt"
LOSS_CSV = "loss.csv"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that changes the trained weights (stored with every checkpoint; resume must match).

    Args:
        config_name: a named backbone configuration (e.g. ``32x32_small``).
        batch_size: images per step. lr: Adam's rate after warm-up. warmup_steps: linear warm-up.
        grad_clip: max gradient norm (0: none). ema_decay: EMA of the weights, updated every step.
        seed: data order, flips, timesteps and noise. weight_seed: fan-in scaled random init of
            every tensor (``extract.backbone.random_init``); None keeps ADM's own initialisation.
        init_sha256: SHA-256 of the checkpoint the weights start from (``pretrain(init=...)``: more text-free
            training of trained weights, e.g. on a new dataset's own images); empty: a fresh initialisation.
        flip: random horizontal flips. channels_last: memory format of the convolutions.
        precision: ``fp32`` (CPU default) or ``bf16``/``fp16`` autocast on GPUs.
        threads: torch CPU threads (CPU bits depend on it).
    """

    config_name: str = "32x32_small"
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0
    weight_seed: int | None = None
    init_sha256: str = ""
    flip: bool = True
    channels_last: bool = True
    precision: str = "fp32"
    threads: int = 2

    def __post_init__(self):
        if self.batch_size < 1 or not self.lr > 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError(f"batch_size >= 1, lr > 0, warmup_steps >= 0 and grad_clip >= 0 are needed, got "
                              f"{self.batch_size}, {self.lr}, {self.warmup_steps}, {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class PretrainResult:
    """Where the run stopped and what it wrote."""

    step: int
    images_seen: int
    seconds: float
    loss: float
    out_dir: Path
    stopped_by: str  # "steps" or "minutes"
    written: list[Path] = field(default_factory=list)


def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + 0x5EED) % (2**63)


def _batch_rows(num_images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of step ``step``: positions step*B .. step*B+B-1 of the concatenated seeded epoch permutations."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, within = positions // num_images, positions % num_images
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([int(seed), int(epoch), 0xDA7A]).permutation(num_images)
        rows[epochs == epoch] = order[within[epochs == epoch]]
    return rows


def _batches(paths: Sequence[str], image_size: int, batch_size: int, seed: int, start: int,
             decode_threads: int) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
    """The decoded batches of steps start, start+1, ..., four ahead on a background thread, so the forward never waits.

    Yields ``(images, errors, positions)``: in a distributed run only this rank's contiguous share of the
    global batch is decoded; ``positions`` are the images' places in the global batch (the step's
    random draws are made for the whole batch and indexed by them). An unreadable image leaves its
    batch (its reason is in the batch's error dict).
    """
    def produce(stop: threading.Event) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
        step = start
        while not stop.is_set():
            rows = _batch_rows(len(paths), batch_size, seed, step)
            positions = np.arange(len(rows))[distributed.share(len(rows))]
            images, ok, errors = load_batch([paths[r] for r in rows[positions]], image_size,
                                            num_threads=max(1, decode_threads))
            yield images[torch.from_numpy(ok)], errors, torch.from_numpy(positions[ok])
            step += 1

    return read_ahead(produce, depth=4, name="diffrep-pretrain-feed")


def _agreed(stop: bool) -> bool:
    """Whether any rank wants to stop (every rank stops at the same step); ``stop`` on one process."""
    if not distributed.active():
        return stop
    return bool(distributed.all_reduce_sum(torch.tensor([int(stop)])).item())


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors: the official layout, whatever the memory format."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_state(state_path: Path, config: PretrainConfig, data: dict) -> dict:
    """``train_state.pt`` as tensors and plain values, refused in one line when its recipe or data differ."""
    state = load_tensors(state_path, "delete it to start over, or pass another --out", what="pretraining checkpoint")
    if not isinstance(state, dict) or not {"model", "ema", "optimizer", "scheduler", "step"} <= set(state):
        raise CheckpointError(f"{state_path} is not a diffrep pretraining checkpoint: delete it or pass another --out")
    for what, saved, asked, flags in (("settings", state.get("config", {}), asdict(config), "settings"),
                                      ("data", state.get("data", {}), data, "--dataset/--split/--limit")):
        changed = {k: (saved.get(k), asked.get(k)) for k in {**saved, **asked} if saved.get(k) != asked.get(k)}
        if changed:
            listed = "; ".join(f"{k} {a!r} saved, {b!r} asked" for k, (a, b) in sorted(changed.items()))
            raise ConfigError(f"{state_path} was trained with other {what} ({listed}): pass the same {flags}, "
                              f"or another --out to train anew")
    return state


def _interrupted(out_dir: Path, step: int, steps: int | None, checkpoint_every: int, kept: int | None) -> RunInterrupted:
    """The one line of a Ctrl-C at ``step``: which step's checkpoint is kept in ``out_dir`` and how to go on."""
    where = f"at step {step}" + (f" of {steps}" if steps is not None else "")
    if kept is None:
        return RunInterrupted(f"interrupted {where}, before the first checkpoint (every {checkpoint_every} steps): "
                              f"nothing is kept; the same command starts again")
    return RunInterrupted(f"interrupted {where}: the checkpoint of step {kept} is in {out_dir}; "
                          f"the same command with --resume continues from it")


@dataclass(frozen=True)
class _Run:
    """What one ``pretrain`` call asks beyond the recipe (see its Args): data, where, how long, how often, on what."""

    paths: list[str]
    out_dir: Path
    steps: int | None
    minutes: float | None
    resume: bool
    checkpoint_every: int
    log_every: int
    device: torch.device
    decode_threads: int
    data: dict
    on_checkpoint: Callable[[nn.Module, int], str | None] | None
    progress: bool
    init: str | os.PathLike | None = None


def pretrain(
    config: PretrainConfig,
    paths: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    log_every: int = 10,
    device: str | torch.device = "cpu",
    decode_threads: int = 1,
    data: dict | None = None,
    on_checkpoint: Callable[[nn.Module, int], str | None] | None = None,
    progress: bool = True,
    init: str | os.PathLike | None = None,
) -> PretrainResult:
    """Train ``config.config_name`` on the images at ``paths`` (labels are never read) until ``steps`` or ``minutes``.

    Args:
        config: the recipe. paths: image files (any size; resized and center-cropped as extract does).
        out_dir: where ``train_state.pt`` (resume), ``ema.pt``, ``model.pt``, their JSONs and ``loss.csv`` go.
        steps: stop after this many optimizer steps in all (counting resumed ones).
        minutes: or stop after this much wall time of this call (a checkpoint is written either way).
        resume: continue from ``out_dir/train_state.pt`` (its config must equal ``config``).
        checkpoint_every: steps between checkpoints. log_every: steps between loss.csv rows.
        device: training device. decode_threads: image-decoding threads ahead of the forward.
        data: what the images are (dataset, split, limit), recorded in the JSONs and in ``train_state.pt``
            with the image count; a resume on other data is refused.
        init: a checkpoint of ``config.config_name`` to start from instead of a fresh initialisation; its SHA-256
            must be ``config.init_sha256`` (so a resume is the same run).
        on_checkpoint: called with the EMA model and the step after each checkpoint; may return a line to log
            (e.g. a quick linear-probe check).

    Returns:
        :class:`PretrainResult`.

    Raises:
        ConfigError: neither steps nor minutes, no images, or a resume with another config or other data.
        CheckpointError: ``train_state.pt`` is damaged or holds objects that are not tensors.
        RunInterrupted: Ctrl-C, saying which step's checkpoint is kept and that ``--resume`` continues.
    """
    if steps is None and minutes is None:
        raise ConfigError("pretraining needs a stopping point: pass --steps N or --minutes M")
    if not paths:
        raise ConfigError("no images to pretrain on: check the dataset and split")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(config.threads)
    run = _Run(paths=list(paths), out_dir=out_dir, steps=steps, minutes=minutes, resume=resume,
               checkpoint_every=checkpoint_every, log_every=log_every, device=device, decode_threads=decode_threads,
               data={**(data or {}), "images": len(paths)}, on_checkpoint=on_checkpoint, progress=progress, init=init)
    try:
        return _pretrain(config, run)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(config: PretrainConfig, run: _Run) -> PretrainResult:
    paths, out_dir, steps, minutes, device = run.paths, run.out_dir, run.steps, run.minutes, run.device
    checkpoint_every, log_every = run.checkpoint_every, run.log_every
    backbone = get_config(config.config_name)
    if backbone.kind != "unet":
        raise ConfigError(f"{config.config_name} is a classifier: diffusion pretraining trains a U-Net configuration")
    if backbone.flags.get("class_cond"):
        raise ConfigError(f"{config.config_name} is class-conditional: text-free pretraining needs an unconditional configuration")
    learn_sigma = bool(backbone.flags.get("learn_sigma", False))
    schedule = get_schedule(backbone.noise_schedule, backbone.diffusion_steps)
    if config.weight_seed is None:
        torch.manual_seed(config.seed)  # ADM's own init draws from the global RNG: make it a function of the seed
    if run.init is not None:
        from extract.backbone.checkpoint import file_sha256

        if file_sha256(run.init) != config.init_sha256:
            raise ConfigError(f"--init {run.init} is not the checkpoint this run was set up with (SHA-256 differs): "
                              f"pass the same file, or another --out to train anew")
        model = create_backbone(config.config_name, checkpoint=str(run.init))
    elif config.init_sha256:
        raise ConfigError("this run starts from a checkpoint (init_sha256 is set): pass it with --init")
    else:
        model = create_backbone(config.config_name, weight_seed=config.weight_seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    trained = distributed.wrap_trained(model, device)  # DDP on several ranks; checkpoints from ``model``
    ema = create_backbone(config.config_name).to(device, memory_format=memory_format).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(params, lr=config.lr, fused=fused)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    state_path = out_dir / STATE_NAME
    step, images_seen, trained_seconds, loss_value = 0, 0, 0.0, float("nan")
    kept = None  # the step of the checkpoint on disk that this run can resume from
    if run.resume and state_path.exists():
        state = _read_state(state_path, config, run.data)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, images_seen = int(state["step"]), int(state["images_seen"])
        trained_seconds, loss_value = float(state["seconds"]), float(state["loss"])
        kept = step
        log.info("resuming pretraining from %s at step %d", state_path, step)
    elif run.resume:
        log.warning("no pretraining checkpoint in %s: starting from step 0", out_dir)
    curve = out_dir / LOSS_CSV
    header = "step,images_seen,seconds,lr,loss,mse,vb\n"
    main = distributed.is_main()  # rank 0 alone writes the curve and the checkpoints
    if main and (step == 0 or not curve.exists()):
        curve.write_text(header)
    elif main:  # rows a killed run logged after its last checkpoint are redone: drop them
        kept = [line for line in curve.read_text().splitlines(keepends=True)[1:] if int(line.split(",")[0]) <= step]
        curve.write_text(header + "".join(kept))

    size = backbone.image_size
    feed = _batches(paths, size, config.batch_size, config.seed, step, run.decode_threads)
    began = time.perf_counter()
    deadline = began + minutes * 60 if minutes is not None else None
    total = steps if steps is not None else None
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=not run.progress or not main,
               dynamic_ncols=True)
    window: list[torch.Tensor] = []
    stopped_by = "steps"
    written: list[Path] = []
    saves: list[int] = []  # the steps checkpointed (on every rank; rank 0 alone writes)

    def save() -> None:
        nonlocal kept
        saves.append(step)
        if not main:
            distributed.barrier()  # wait until rank 0 has written the step
            kept = step
            return
        seconds = trained_seconds + (time.perf_counter() - began)
        _save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "step": step, "images_seen": images_seen,
                      "seconds": seconds, "loss": loss_value, "config": asdict(config), "data": run.data}, state_path)
        kept = step
        meta = {"config": asdict(config), "flags": dict(backbone.flags), "noise_schedule": backbone.noise_schedule,
                "diffusion_steps": backbone.diffusion_steps, "data": run.data, "steps": step, "images_seen": images_seen,
                "wall_seconds": round(seconds, 1), "final_loss": loss_value, "device": str(device),
                "torch": torch.__version__}
        for name, module in ((EMA_NAME, ema), (MODEL_NAME, model)):
            path = out_dir / name
            _save_atomic(_plain_state(module), path)
            _write_json(path.with_suffix(".json"), {**meta, "weights": "ema" if module is ema else "model"})
            written.append(path)
        if run.on_checkpoint is not None:
            line = run.on_checkpoint(ema, step)
            if line:
                tqdm.write(line)
        distributed.barrier()

    try:
        while True:
            if steps is not None and step >= steps:
                break
            if deadline is not None and _agreed(time.perf_counter() >= deadline):
                stopped_by = "minutes"
                break
            x0, _errors, positions = next(feed)
            generator = torch.Generator().manual_seed(_step_seed(config.seed, step))
            drawn = config.batch_size  # every draw is made for the global batch, then this rank's rows taken
            if config.flip:
                flips = (torch.rand(drawn, generator=generator) < 0.5)[positions]
                x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
            t = torch.randint(0, schedule.num_steps, (drawn,), generator=generator)[positions]
            noise = torch.randn((drawn, *x0.shape[1:]), generator=generator)[positions]
            local = x0.shape[0]
            n = distributed.global_count(local)
            x0 = x0.to(device).contiguous(memory_format=memory_format)
            noise = noise.to(device).contiguous(memory_format=memory_format)
            t = t.to(device)
            with autocast(device, config.precision):
                loss, terms = diffusion_loss(trained, schedule, x0, t, noise, learn_sigma)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages over ranks: weighting each rank's mean by its share makes it the global batch's mean
            (loss * (local * distributed.world_size() / n) if distributed.active() else loss).backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - config.ema_decay)
            step += 1
            images_seen += n
            logged = torch.stack([loss.detach().float(), terms["mse"].mean().float(), terms["vb"].mean().float()])
            if distributed.active():
                logged = distributed.all_reduce_sum(logged.double().cpu() * local) / n
            window.append(logged)
            if step % log_every == 0 or (steps is not None and step >= steps):
                means = torch.stack(window).mean(0).tolist()
                window.clear()
                loss_value = means[0]
                seconds = trained_seconds + (time.perf_counter() - began)
                with open(curve if main else os.devnull, "a") as f:
                    f.write(f"{step},{images_seen},{seconds:.1f},{optimizer.param_groups[0]['lr']:.6g},"
                            f"{means[0]:.6f},{means[1]:.6f},{means[2]:.6f}\n")
                bar.set_postfix(loss=f"{means[0]:.4f}", mse=f"{means[1]:.4f}")
            bar.update(1)
            if step % checkpoint_every == 0:
                save()
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise _interrupted(out_dir, step, steps, checkpoint_every, kept) from None
    finally:
        feed.close()
        bar.close()
    if window:
        loss_value = torch.stack(window).mean(0)[0].item()
    if step % checkpoint_every or not saves:  # the last step's checkpoint is not written yet
        save()
    seconds = trained_seconds + (time.perf_counter() - began)
    return PretrainResult(step=step, images_seen=images_seen, seconds=seconds, loss=loss_value, out_dir=out_dir,
                          stopped_by=stopped_by, written=sorted(set(written)))
