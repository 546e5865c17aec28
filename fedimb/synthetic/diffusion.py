"""Train and sample the class-conditional DDPM: diffusers' UNet + schedulers, our short loops.

Training is epsilon prediction (or v prediction, a per-generator choice) with a
``DDPMScheduler`` (linear betas, T steps): ``x_t = add_noise(x_0, eps, t)``, loss
``||unet(x_t, t, y) - eps||²`` (or ``- v``), with the label replaced by the null id with
probability ``p_uncond`` so that the same network also learns the unconditional score.
Sampling uses a ``DDIMScheduler`` built from the training scheduler's config and
classifier-free guidance ``out = out_u + w (out_c - out_u)``.

Images enter and leave in the classifier's normalised space. Inside, they are mapped
affinely from the stored data range ``[lo, hi]`` to ``[-1, 1]`` (so the scheduler's
``clip_sample`` at ±1 matches the data) and padded to a size the UNet can halve.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel, compute_snr

from fedimb.generation.model import (image_channels, image_size, null_class, padded_size, patch_size, prediction_type,
                                     set_data_range)
from fedimb.generation.model import data_range as stored_range


def training_scheduler(unet: UNet2DModel) -> DDPMScheduler:
    """The DDPM noise schedule this generator is (or will be) trained with."""
    return DDPMScheduler(num_train_timesteps=int(unet.config.num_train_timesteps or 1000),
                         prediction_type=prediction_type(unet))


def sampling_scheduler(unet: UNet2DModel, num_inference_steps: int) -> DDIMScheduler:
    """A DDIM scheduler on the training schedule, set to ``num_inference_steps`` steps."""
    # "trailing" starts at t = T-1; the default "leading" starts at T - T/steps, which leaves
    # noise the model never saw at t = T-1 unremoved (Lin et al. 2023, "Common diffusion noise
    # schedules and sample steps are flawed").
    scheduler = DDIMScheduler.from_config(training_scheduler(unet).config, timestep_spacing="trailing")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def to_model_space(unet: UNet2DModel, images: torch.Tensor) -> torch.Tensor:
    """Normalised-space images (N, C, H, W) -> the UNet's padded [-1, 1] space."""
    lo, hi = stored_range(unet) or (-1.0, 1.0)
    x = (images.float() - lo) * (2.0 / (hi - lo)) - 1.0
    (height, width), (ph, pw) = image_size(unet), padded_size(unet)
    if (ph, pw) != (height, width):
        x = F.pad(x, (0, pw - width, 0, ph - height), mode="replicate")
    return F.pixel_unshuffle(x, patch_size(unet)) if patch_size(unet) > 1 else x


def from_model_space(unet: UNet2DModel, x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_space`: crop the padding, map [-1, 1] back to the data range."""
    lo, hi = stored_range(unet) or (-1.0, 1.0)
    height, width = image_size(unet)
    if patch_size(unet) > 1:
        x = F.pixel_shuffle(x, patch_size(unet))
    return (x[..., :height, :width] + 1.0) * ((hi - lo) / 2.0) + lo


@contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress  # deferred: only interactive callers want a bar

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _check_inputs(unet: UNet2DModel, labels: torch.Tensor, images: torch.Tensor | None = None) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > null_class(unet)):
        raise ValueError(f"labels must lie in [0, {null_class(unet)}] (the last id is the null class)")
    expected = (image_channels(unet), *image_size(unet))
    if images is not None and tuple(images.shape[1:]) != expected:
        raise ValueError(f"images of shape {tuple(images.shape[1:])} given to a generator for {expected}")
    if images is not None and len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")


def _choose_range(
    unet: UNet2DModel, images: torch.Tensor, given: tuple[float, float] | None
) -> tuple[float, float]:
    # A range already stored wins over the data's own min/max: a second call (another round of
    # federated training) must keep the space the weights were trained in.
    if given is not None:
        return given
    stored = stored_range(unet)
    return stored if stored is not None else (float(images.min()), float(images.max()))


def class_balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample draw weights 1 / (size of its class): every class present gets the same total."""
    labels = labels.long().cpu()
    return 1.0 / torch.bincount(labels)[labels].double()


def _denoising_loss(predicted: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler,
                    snr_gamma: float) -> torch.Tensor:
    if snr_gamma <= 0:
        return F.mse_loss(predicted, target)
    snr = compute_snr(scheduler, t)
    # Min-SNR on x0's error: the eps loss carries a factor SNR, the v loss a factor SNR + 1.
    scale = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    weight = torch.clamp(snr, max=snr_gamma) / scale
    per_sample = F.mse_loss(predicted, target, reduction="none").mean(dim=tuple(range(1, predicted.ndim)))
    return (weight * per_sample).mean()


def train_generator(
    unet: UNet2DModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    p_uncond: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    num_train_timesteps: int = 1000,
    data_range: tuple[float, float] | None = None,
    ema_decay: float = 0.999,
    balanced: bool = False,
    snr_gamma: float = 0.0,
) -> float:
    """Train ``unet`` in place for ``steps`` batches; return the mean loss of the last 10% of steps.

    ``data_range`` is the (lo, hi) mapped to [-1, 1]; by default the range stored by an earlier
    call or given to ``build_generator``, else the min/max of ``images``; federated clients must
    share one range (see ``build_generator``).
    ``ema_decay`` > 0 keeps an exponential moving average of the weights (diffusers'
    ``EMAModel``, warm-up decay ``(1+s)/(10+s)`` capped at ``ema_decay``) and leaves the
    average in ``unet`` at the end; 0 keeps the raw weights. The average restarts with every
    call, so short federated rounds may prefer 0. ``balanced`` draws every class present equally
    often (sample weight 1 / its class count) instead of every image. ``snr_gamma`` > 0 weights
    each sample's loss by ``min(SNR(t), gamma) / SNR(t)`` (``/ (SNR(t) + 1)`` for a v-predicting
    generator; Min-SNR, Hang et al. 2023), so the nearly clean timesteps stop dominating the
    gradient; 0 is the plain mean. ``unet`` is left in eval mode.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_inputs(unet, labels, images)
    device = unet.device
    set_data_range(unet, *_choose_range(unet, images, data_range))
    unet.register_to_config(num_train_timesteps=int(num_train_timesteps))
    scheduler = training_scheduler(unet)
    predicts_v = scheduler.config.prediction_type == "v_prediction"
    x_all = to_model_space(unet, images).to(device)
    y_all = labels.long().to(device)
    null = null_class(unet)
    gen = torch.Generator().manual_seed(seed)
    draw_weights = class_balanced_weights(labels) if balanced else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    ema = EMAModel(unet.parameters(), decay=ema_decay) if ema_decay > 0 else None
    tail_start = steps - max(1, steps // 10)
    tail: list[float] = []
    unet.train()
    with _progress(progress, steps, "training generator") as advance:
        for step in range(steps):
            # All randomness comes from one CPU generator: the same seed gives the same run on any device.
            idx = (torch.multinomial(draw_weights, batch_size, replacement=True, generator=gen) if balanced
                   else torch.randint(len(x_all), (batch_size,), generator=gen))
            drop = torch.rand(batch_size, generator=gen) < p_uncond
            noise = torch.randn((batch_size, *x_all.shape[1:]), generator=gen).to(device)
            t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(device)
            idx, drop = idx.to(device), drop.to(device)
            y = torch.where(drop, torch.full_like(y_all[idx], null), y_all[idx])
            noisy = scheduler.add_noise(x_all[idx], noise, t)
            target = scheduler.get_velocity(x_all[idx], noise, t) if predicts_v else noise
            loss = _denoising_loss(unet(noisy, t, class_labels=y).sample, target, t, scheduler, snr_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # as diffusers' training examples
            optimizer.step()
            if ema is not None:
                ema.step(unet.parameters())
            if step >= tail_start:
                tail.append(loss.item())
            advance()
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    return float(np.mean(tail))


@torch.inference_mode()
def sample(
    unet: UNet2DModel,
    labels: torch.Tensor,
    guidance_scale: float | torch.Tensor = 2.0,
    num_inference_steps: int = 20,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    guidance_rescale: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Generate one image per label, (N, C, H, W) float32 on the CPU, in the training data's space.

    DDIM (eta = 0) with classifier-free guidance; conditional and unconditional predictions
    come from one batched forward pass of 2·batch. ``guidance_scale`` 1 is plain conditional
    sampling and skips the unconditional half. The same ``seed`` gives the same images.
    ``guidance_interval`` (lo, hi), fractions of the training schedule's T: guidance acts only
    on the steps with lo·T <= t <= hi·T, the others are plain conditional steps (guidance in a
    limited interval, Kynkäänniemi et al. 2024). ``guidance_rescale`` φ in [0, 1] pulls the
    guided output's per-image std back towards the conditional one's (Lin et al. 2023), which
    counters the over-saturation of strong guidance. Either knob may also be a tensor with one
    value per label (a sampler per class); the noise, and so every other image, stays the same.
    ``batch_size`` 128 (256 UNet rows with guidance) is the fastest on a CPU: 512 rows run
    ~30% slower per image there (cache); on a GPU pass more.
    """
    labels = labels.long().reshape(-1)
    _check_inputs(unet, labels)
    if stored_range(unet) is None:
        # Loud on purpose: weights loaded with load_state_dict into a fresh build have no range,
        # and samples would silently come back on the wrong scale.
        raise ValueError("the generator has no data range: train it, or build it with data_range=(lo, hi)")
    device, was_training = unet.device, unet.training
    unet.eval()
    scheduler = sampling_scheduler(unet, num_inference_steps)
    scales = _per_label(guidance_scale, labels, "guidance_scale")
    phis = _per_label(guidance_rescale, labels, "guidance_rescale")
    guided = bool((scales != 1.0).any())
    horizon = float(scheduler.config.num_train_timesteps)
    lo_t, hi_t = guidance_interval[0] * horizon, guidance_interval[1] * horizon
    # All starting noise drawn at once, so the images do not depend on batch_size.
    patch = patch_size(unet)
    inner = tuple(side // patch for side in padded_size(unet))
    noise = torch.randn(
        (len(labels), unet.config.in_channels, *inner), generator=torch.Generator().manual_seed(seed)
    )
    out = []
    chunks = range(0, len(labels), batch_size)
    with _progress(progress, len(chunks) * len(scheduler.timesteps), "sampling") as advance:
        for start in chunks:
            x = noise[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            scale, phi = (v[start : start + batch_size].to(device).view(-1, *[1] * (x.dim() - 1)) for v in (scales, phis))
            both = torch.cat([y, torch.full_like(y, null_class(unet))])
            for t in scheduler.timesteps:
                # The output is eps or v; both are affine in x0 and eps, so guidance mixes either alike.
                if guided and lo_t <= float(t) <= hi_t:
                    cond, uncond = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
                    out_t = _rescaled(uncond + scale * (cond - uncond), cond, phi)
                else:
                    out_t = unet(x, t, class_labels=y).sample
                x = scheduler.step(out_t, t, x).prev_sample
                advance()
            out.append(from_model_space(unet, x).float().cpu())
    unet.train(was_training)
    empty = torch.zeros((0, image_channels(unet), *image_size(unet)))
    return torch.cat(out) if out else empty


def _per_label(value: float | torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """A sampling knob as one float32 value per label (a scalar is broadcast)."""
    values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if values.numel() == 1:
        return values.expand(len(labels))
    if values.numel() != len(labels):
        raise ValueError(f"{name} has {values.numel()} values for {len(labels)} labels; pass one or one per label")
    return values


def _rescaled(guided: torch.Tensor, cond: torch.Tensor, phi: float | torch.Tensor) -> torch.Tensor:
    phi = torch.as_tensor(phi, dtype=guided.dtype, device=guided.device)
    if bool((phi <= 0).all()):
        return guided
    dims = tuple(range(1, guided.dim()))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8))
    return phi * matched + (1.0 - phi) * guided


def save_generator(unet: UNet2DModel, path: str | os.PathLike[str]) -> Path:
    """Save the UNet (config + safetensors) and its DDPM scheduler config into folder ``path``.

    Written to a temporary sibling folder first and then renamed, so a killed save never
    leaves a half-written generator behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        unet.save_pretrained(tmp)
        training_scheduler(unet).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_generator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> UNet2DModel:
    """Load a generator saved by :func:`save_generator`, in eval mode on ``device``."""
    # Without `accelerate` installed, the default low_cpu_mem_usage=True only logs a warning.
    unet = UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False)
    return unet.to(device).eval()
