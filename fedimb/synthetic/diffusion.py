"""Train and sample a :class:`~fedimb.synthetic.generator.Generator`: our short loops around diffusers' parts.

Training is epsilon prediction (or v prediction, a per-generator choice) with a
``DDPMScheduler`` (linear betas, T steps): ``x_t = add_noise(x_0, eps, t)``, loss
``||unet(x_t, t, y) - eps||²`` (or ``- v``), with the label replaced by the null id with
probability ``p_uncond`` so that the same network also learns the unconditional score.
Sampling uses a ``DDIMScheduler`` built from the training scheduler's config and
classifier-free guidance ``out = out_u + w (out_c - out_u)``. Both are the generator's methods
(``generator.train(...)``, ``generator.sample(...)``).

Images enter and leave in the classifier's normalised space. Inside, they are mapped
affinely from the stored data range ``[lo, hi]`` to ``[-1, 1]`` (so the scheduler's
``clip_sample`` at ±1 matches the data) and padded to a size the UNet can halve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

if TYPE_CHECKING:
    from fedimb.synthetic.generator import Generator


@contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress  # deferred: only interactive callers want a bar

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _check_inputs(generator: Generator, labels: torch.Tensor, images: torch.Tensor | None = None) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > generator.null_class):
        raise ValueError(f"labels must lie in [0, {generator.null_class}] (the last id is the null class)")
    expected = generator.image_shape
    if images is not None and tuple(images.shape[1:]) != expected:
        raise ValueError(f"images of shape {tuple(images.shape[1:])} given to a generator for {expected}")
    if images is not None and len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")


def _choose_range(
    generator: Generator, images: torch.Tensor, given: tuple[float, float] | None
) -> tuple[float, float]:
    # A range already stored wins over the data's own min/max: a second call (another round of
    # federated training) must keep the space the weights were trained in.
    if given is not None:
        return given
    stored = generator.data_range
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


def train(
    generator: Generator,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    p_uncond: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    data_range: tuple[float, float] | None = None,
    ema_decay: float = 0.999,
    balanced: bool = False,
    snr_gamma: float = 0.0,
) -> float:
    """Train ``generator`` in place for ``steps`` batches; return the mean loss of the last 10% of steps.

    ``data_range`` is the (lo, hi) mapped to [-1, 1]; by default the range stored by an earlier
    call or given to ``Generator.build``, else the min/max of ``images``; federated clients must
    share one range (see ``Generator.build``).
    ``ema_decay`` > 0 keeps an exponential moving average of the weights (diffusers'
    ``EMAModel``, warm-up decay ``(1+s)/(10+s)`` capped at ``ema_decay``) and leaves the
    average in the UNet at the end; 0 keeps the raw weights. The average restarts with every
    call, so short federated rounds may prefer 0. ``balanced`` draws every class present equally
    often (sample weight 1 / its class count) instead of every image. ``snr_gamma`` > 0 weights
    each sample's loss by ``min(SNR(t), gamma) / SNR(t)`` (``/ (SNR(t) + 1)`` for a v-predicting
    generator; Min-SNR, Hang et al. 2023), so the nearly clean timesteps stop dominating the
    gradient; 0 is the plain mean. The UNet is left in eval mode.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_inputs(generator, labels, images)
    unet, scheduler, device = generator.unet, generator.scheduler, generator.device
    generator.set_data_range(*_choose_range(generator, images, data_range))
    predicts_v = scheduler.config.prediction_type == "v_prediction"
    x_all = generator.to_model_space(images).to(device)
    y_all = labels.long().to(device)
    null = generator.null_class
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
    generator: Generator,
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
    _check_inputs(generator, labels)
    if generator.data_range is None:
        # Loud on purpose: weights loaded with load_state_dict into a fresh build have no range,
        # and samples would silently come back on the wrong scale.
        raise ValueError("the generator has no data range: train it, or build it with data_range=(lo, hi)")
    unet, device = generator.unet, generator.device
    was_training = unet.training
    unet.eval()
    scheduler = generator.sampling_scheduler(num_inference_steps)
    scales = _per_label(guidance_scale, labels, "guidance_scale")
    phis = _per_label(guidance_rescale, labels, "guidance_rescale")
    guided = bool((scales != 1.0).any())
    horizon = float(scheduler.config.num_train_timesteps)
    lo_t, hi_t = guidance_interval[0] * horizon, guidance_interval[1] * horizon
    # All starting noise drawn at once, so the images do not depend on batch_size.
    inner = tuple(side // generator.meta.patch for side in generator.padded_size)
    noise = torch.randn(
        (len(labels), unet.config.in_channels, *inner), generator=torch.Generator().manual_seed(seed)
    )
    out = []
    chunks = range(0, len(labels), batch_size)
    with _progress(progress, len(chunks) * len(scheduler.timesteps), "sampling") as advance:
        for start in chunks:
            x = noise[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            scale, phi = (v[start : start + batch_size].to(device).view(-1, *[1] * (x.dim() - 1))
                          for v in (scales, phis))
            both = torch.cat([y, torch.full_like(y, generator.null_class)])
            for t in scheduler.timesteps:
                # The output is eps or v; both are affine in x0 and eps, so guidance mixes either alike.
                if guided and lo_t <= float(t) <= hi_t:
                    cond, uncond = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
                    out_t = _rescaled(uncond + scale * (cond - uncond), cond, phi)
                else:
                    out_t = unet(x, t, class_labels=y).sample
                x = scheduler.step(out_t, t, x).prev_sample
                advance()
            out.append(generator.from_model_space(x).float().cpu())
    unet.train(was_training)
    empty = torch.zeros((0, *generator.image_shape))
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
