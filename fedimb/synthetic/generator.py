"""The class-conditional generator: a diffusers ``UNet2DModel`` built by size name.

The class embedding has ``num_classes + 1`` rows; the last id is the null ("unconditional")
token that classifier-free guidance needs. Besides the UNet's own fields, ``unet.config``
carries what sampling needs to reproduce training, so one saved folder is the whole generator:

* ``num_train_timesteps``: length of the DDPM noise schedule. It is a genuine
  ``UNet2DModel`` field (read only by its "learned" time embedding, which we do not use), so
  it costs nothing and travels with ``save_pretrained`` / ``from_pretrained``.
* ``_fedimb_data_range``: ``[lo, hi]`` of the training images in the classifier's normalised
  space; the diffusion itself runs on ``[-1, 1]``. The leading underscore matters: on
  ``from_pretrained`` diffusers re-registers unknown *private* keys silently, while unknown
  public keys are kept too but logged as "will be ignored".

* ``_fedimb_image_shape``: ``[C, H, W]`` of the images, and ``_fedimb_patch``: p of the
  space-to-depth step. With p > 1 the UNet works on ``pixel_unshuffle(x, p)``, a
  (C·p², H/p, W/p) tensor: 4× fewer positions for p = 2, so with the same channels the CPU
  size trains 2.4× and samples 3.4× faster than at full resolution on 2 idle threads (the
  patch embedding of DiT).

Spatial sizes: the patch divides H and W, and each extra resolution level halves them again,
so H and W must be multiples of ``p · 2 ** (levels - 1)``. 28×28 works unpadded with p = 2
and 2 levels (28→14→7) or p = 1 and up to 3 levels; other sizes are padded (replicate)
inside training and sampling and cropped back.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel

from fedimb.config import GENERATOR_PREDICTIONS, ConfigError

DATA_RANGE_KEY = "_fedimb_data_range"
IMAGE_SHAPE_KEY = "_fedimb_image_shape"
PATCH_KEY = "_fedimb_patch"
PREDICTION_KEY = "_fedimb_prediction"

# UNet2DModel kwargs by name (plus our "patch", see the module docstring). Parameters on
# 1×28×28 with 10 classes (+1 null); speeds on 2 idle CPU threads, batch 64 training and 20
# guided DDIM steps (python benchmarks/synthetic_speed.py --sizes cpu cpu28):
#   cpu      161,268  patch 2 (4×14×14), (16, 32), no attention; 557 train samples/s, 44.6 images/s
#   cpu28    160,401  the same channels at full 28×28: 228 train samples/s, 13.0 images/s
#   small  1,114,209  (32, 64, 64), attention at 7×7 and in the middle block
#   gpu   16,056,961  (64, 128, 256), 2 layers per block, attention at 14×14, 7×7 and middle
# GroupNorm's default 32 groups does not divide 16 channels, hence norm_num_groups=8 below.
_CPU_UNET: dict[str, Any] = {
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "add_attention": False,  # the middle block keeps its two ResNets, drops attention
    "norm_num_groups": 8,
}
GENERATOR_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {**_CPU_UNET, "patch": 2},
    "cpu28": dict(_CPU_UNET),
    "small": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "attention_head_dim": 32,
        "norm_num_groups": 8,
    },
    "gpu": {
        "block_out_channels": (64, 128, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 64,
        "norm_num_groups": 32,
    },
}


def build_generator(
    size: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
    data_range: tuple[float, float] | None = None,
    prediction: str = "epsilon",
) -> UNet2DModel:
    """A fresh UNet for ``image_shape`` (C, H, W) and ``num_classes`` (+1 null id), seeded init.

    ``prediction`` is what the network outputs: ``epsilon`` (the noise) or ``v_prediction``
    (``v = sqrt(a) eps - sqrt(1 - a) x0``, Salimans & Ho 2022); it is stored in the UNet's
    config, so training and sampling schedulers follow it after a save and load.

    ``data_range`` (lo, hi) of the normalised images fixes the [-1, 1] mapping up front. A
    federation needs it: ``load_state_dict`` carries weights only, not ``unet.config``, so
    every party (server, each client) must build its copy with the same range.
    """
    if size not in GENERATOR_SIZES:
        raise ConfigError(
            "synthetic.generator_size", f"'{size}' is not allowed; choose one of {', '.join(GENERATOR_SIZES)}"
        )
    if prediction not in GENERATOR_PREDICTIONS:
        raise ConfigError(
            "synthetic.prediction", f"'{prediction}' is not allowed; choose one of {', '.join(GENERATOR_PREDICTIONS)}"
        )
    channels, height, width = (int(v) for v in image_shape)
    unet_kwargs = dict(GENERATOR_SIZES[size])
    patch = int(unet_kwargs.pop("patch", 1))
    multiple = patch * 2 ** (len(unet_kwargs["block_out_channels"]) - 1)
    inner_h, inner_w = (-(-side // multiple) * multiple // patch for side in (height, width))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=inner_h if inner_h == inner_w else (inner_h, inner_w),
            in_channels=channels * patch * patch,
            out_channels=channels * patch * patch,
            num_class_embeds=num_classes + 1,
            num_train_timesteps=1000,
            **unet_kwargs,
        )
    unet.register_to_config(
        **{IMAGE_SHAPE_KEY: [channels, height, width], PATCH_KEY: patch, PREDICTION_KEY: prediction}
    )
    if data_range is not None:
        set_data_range(unet, *data_range)
    return unet


def null_class(unet: UNet2DModel) -> int:
    """The class id that means "no class" (classifier-free guidance's unconditional token)."""
    return int(unet.config.num_class_embeds) - 1


def prediction_type(unet: UNet2DModel) -> str:
    """What the UNet predicts: ``epsilon`` (also for generators saved before the key existed) or ``v_prediction``."""
    return str(unet.config.get(PREDICTION_KEY) or "epsilon")


def patch_size(unet: UNet2DModel) -> int:
    """p of the space-to-depth step (1: the UNet sees the images at full resolution)."""
    return int(unet.config.get(PATCH_KEY) or 1)


def image_channels(unet: UNet2DModel) -> int:
    """Channels of the images the generator makes (the UNet has ``p²`` times as many)."""
    shape = unet.config.get(IMAGE_SHAPE_KEY)
    return int(shape[0]) if shape else int(unet.config.in_channels)


def image_size(unet: UNet2DModel) -> tuple[int, int]:
    """(H, W) of the images the generator makes, before any internal padding."""
    shape = unet.config.get(IMAGE_SHAPE_KEY)
    if shape:
        return int(shape[1]), int(shape[2])
    size = unet.config.sample_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def padded_size(unet: UNet2DModel) -> tuple[int, int]:
    """(H, W) rounded up to the multiple of ``p · 2 ** (levels - 1)`` the UNet can down/upsample."""
    multiple = patch_size(unet) * 2 ** (len(unet.config.block_out_channels) - 1)
    return tuple(-(-side // multiple) * multiple for side in image_size(unet))  # type: ignore[return-value]


def data_range(unet: UNet2DModel) -> tuple[float, float] | None:
    """The ``(lo, hi)`` of the training data's normalised space, or None before any training."""
    value = unet.config.get(DATA_RANGE_KEY)
    return None if value is None else (float(value[0]), float(value[1]))


def set_data_range(unet: UNet2DModel, lo: float, hi: float) -> None:
    """Store the data range in ``unet.config`` (saved and loaded with the weights)."""
    if not hi > lo:
        raise ValueError(f"data range must have hi > lo, got ({lo}, {hi})")
    unet.register_to_config(**{DATA_RANGE_KEY: [float(lo), float(hi)]})
