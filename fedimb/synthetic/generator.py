"""The class-conditional generator: a diffusers ``UNet2DModel``, its ``DDPMScheduler`` and its metadata.

The class embedding has ``num_classes + 1`` rows; the last id is the null ("unconditional")
token that classifier-free guidance needs. A generator conditioned on (class, acquisition
domain) pairs keeps the same single table, one row per pair: ``num_classes · num_domains + 1``
rows, pair id ``domain · num_classes + class`` (:meth:`Generator.condition_ids`), the null id
last. One table is what ``UNet2DModel`` supports natively (``num_class_embeds``), so saving,
loading, FedAvg and the class-aware aggregation of its rows work on pairs unchanged; the price
is that a pair no client holds has an untrained row (the top-up skips such pairs), where summed
class and domain embeddings might compose them. The scheduler's config holds the noise schedule
(T steps, linear betas) and what the UNet predicts (``epsilon`` or ``v_prediction``).
:class:`GeneratorMeta` holds what diffusers has no field for:

* the domain names the pair ids refer to (none: conditioned on the class alone);
* the data range ``(lo, hi)`` of the training images in the classifier's normalised space; the
  diffusion itself runs on ``[-1, 1]``;
* the image shape ``(C, H, W)`` and the patch p of the space-to-depth step. With p > 1 the UNet
  works on ``pixel_unshuffle(x, p)``, a (C·p², H/p, W/p) tensor: 4× fewer positions for p = 2,
  so with the same channels the CPU size trains 2.4× and samples 3.4× faster than at full
  resolution on 2 idle threads (the patch embedding of DiT).

Spatial sizes: the patch divides H and W, and each extra resolution level halves them again,
so H and W must be multiples of ``p · 2 ** (levels - 1)``. 28×28 works unpadded with p = 2
and 2 levels (28→14→7) or p = 1 and up to 3 levels; other sizes are padded (replicate)
inside training and sampling and cropped back.

One folder is the whole generator, as diffusers saves its parts: the UNet's ``config.json`` and
weights, ``scheduler_config.json`` and our ``generator_config.json``. Folders written before
the last file existed kept the metadata as ``_fedimb_*`` keys of the UNet's config; they load too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import FrozenDict

from fedimb.config import GENERATOR_PREDICTIONS, ConfigError
from fedimb.synthetic.diffusion import sample, train

EMBEDDING_KEY = "class_embedding.weight"  # the UNet's (num_classes + 1) x D label table
METADATA_FILE = "generator_config.json"
NUM_TRAIN_TIMESTEPS = 1000
_LEGACY_PREFIX = "_fedimb_"

# UNet2DModel kwargs by name (plus our "patch", see the module docstring). Parameters on
# 1×28×28 with 10 classes (+1 null); speeds on 2 idle CPU threads, batch 64 training and 20
# guided DDIM steps (python -m benchmarks.synthetic_speed --sizes cpu cpu28):
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
    "small": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "attention_head_dim": 32,
              "norm_num_groups": 8, "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")},
    "gpu": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "attention_head_dim": 64,
            "norm_num_groups": 32, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
}


@dataclass(frozen=True)
class GeneratorMeta:
    """What sampling needs besides the UNet's and the scheduler's configs (``generator_config.json``)."""

    image_shape: tuple[int, int, int]  # (C, H, W) of the images, before patching and padding
    patch: int = 1  # p of the space-to-depth step (1: the UNet sees full resolution)
    data_range: tuple[float, float] | None = None  # (lo, hi) mapped to [-1, 1]; None before training
    size: str | None = None  # the GENERATOR_SIZES name; None in folders saved before it was kept
    # the acquisition domains of the pair ids (domains.names order); () = conditioned on the class alone
    domains: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GeneratorMeta:
        """The metadata from its JSON form (lists back to tuples; folders without ``domains`` are class-only)."""
        lo_hi = values.get("data_range")
        return cls(image_shape=tuple(int(v) for v in values["image_shape"]), patch=int(values.get("patch", 1)),
                   data_range=None if lo_hi is None else (float(lo_hi[0]), float(lo_hi[1])), size=values.get("size"),
                   domains=tuple(str(d) for d in values.get("domains", ())))

    @classmethod
    def from_legacy(cls, config: dict[str, Any]) -> GeneratorMeta:
        """The metadata of a folder that kept it in the UNet's config (``_fedimb_*`` keys)."""
        shape = config.get(f"{_LEGACY_PREFIX}image_shape")
        if not shape:  # older still: the UNet saw the images unpatched and unpadded
            side = config["sample_size"]
            shape = (config["in_channels"], *((side, side) if isinstance(side, int) else side))
        return cls.from_dict({"image_shape": shape, "patch": config.get(f"{_LEGACY_PREFIX}patch") or 1,
                              "data_range": config.get(f"{_LEGACY_PREFIX}data_range")})


class Generator:
    """A class-conditional DDPM generator: ``unet``, its training ``scheduler`` and its ``meta``.

    ``train`` and ``sample`` are :func:`fedimb.synthetic.diffusion.train` and
    :func:`~fedimb.synthetic.diffusion.sample`; images enter and leave in the classifier's
    normalised space. Weights travel as :meth:`state_dict`; the data range does not, so every
    party of a federation builds its copy with the same range.
    """

    train = train
    sample = sample

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, meta: GeneratorMeta) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.meta = meta

    @classmethod
    def build(cls, size: str, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0,
              data_range: tuple[float, float] | None = None, prediction: str = "epsilon",
              domains: Sequence[str] = ()) -> Generator:
        """A fresh generator for ``image_shape`` (C, H, W) and ``num_classes`` (+1 null id), seeded init.

        ``domains`` (names) conditions it on (class, domain) pairs instead: one label row per
        pair (:meth:`condition_ids`) and the null row.

        ``prediction`` is what the network outputs: ``epsilon`` (the noise) or ``v_prediction``
        (``v = sqrt(a) eps - sqrt(1 - a) x0``, Salimans & Ho 2022). ``data_range`` (lo, hi) of
        the normalised images fixes the [-1, 1] mapping up front; a federation needs it, since
        weights travel without it.
        """
        if size not in GENERATOR_SIZES:
            raise ConfigError(
                "synthetic.generator_size", f"'{size}' is not allowed; choose one of {', '.join(GENERATOR_SIZES)}"
            )
        if prediction not in GENERATOR_PREDICTIONS:
            raise ConfigError(
                "synthetic.prediction",
                f"'{prediction}' is not allowed; choose one of {', '.join(GENERATOR_PREDICTIONS)}"
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
                num_class_embeds=num_classes * max(1, len(domains)) + 1,
                num_train_timesteps=NUM_TRAIN_TIMESTEPS,  # a UNet field read only by learned time embeddings
                **unet_kwargs,
            )
        scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=prediction)
        generator = cls(unet, scheduler, GeneratorMeta((channels, height, width), patch, size=size,
                                                       domains=tuple(str(d) for d in domains)))
        if data_range is not None:
            generator.set_data_range(*data_range)
        return generator

    @property
    def num_conditions(self) -> int:
        """Label ids the generator samples: its classes, or its (class, domain) pairs; the null id is one more."""
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def domains(self) -> tuple[str, ...]:
        """The domain names of the pair ids, in order; () for a generator conditioned on the class alone."""
        return self.meta.domains

    @property
    def num_classes(self) -> int:
        """Real classes (per domain, for a pair-conditioned generator)."""
        return self.num_conditions // max(1, len(self.domains))

    @property
    def null_class(self) -> int:
        """The label id that means "no class" (classifier-free guidance's unconditional token), the last."""
        return self.num_conditions

    def condition_ids(self, classes: torch.Tensor, domains: torch.Tensor | int | None = None) -> torch.Tensor:
        """The label ids of ``classes`` (in ``domains``, indices into :attr:`domains`) as the UNet takes them.

        ``domain · num_classes + class`` for a pair-conditioned generator (``domains`` required,
        one index or one per class); the classes themselves for a class-conditional one.
        """
        classes = torch.as_tensor(classes).long()
        if not self.domains:
            if domains is not None:
                raise ValueError("this generator is conditioned on the class alone; pass no domains")
            return classes
        if domains is None:
            raise ValueError(f"this generator is conditioned on (class, domain): pass a domain of {list(self.domains)}")
        index = torch.as_tensor(domains).long().expand_as(classes)
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"classes must lie in [0, {self.num_classes - 1}]")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.domains)):
            raise ValueError(f"domain indices must lie in [0, {len(self.domains) - 1}] ({list(self.domains)})")
        return index * self.num_classes + classes

    @property
    def prediction(self) -> str:
        """What the UNet predicts: ``epsilon`` or ``v_prediction``."""
        return str(self.scheduler.config.prediction_type)

    @property
    def data_range(self) -> tuple[float, float] | None:
        """The ``(lo, hi)`` of the training data's normalised space, or None before any training."""
        return self.meta.data_range

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the generator makes, before any internal padding."""
        return self.meta.image_shape

    @property
    def padded_size(self) -> tuple[int, int]:
        """(H, W) rounded up to the multiple of ``p · 2 ** (levels - 1)`` the UNet can down/upsample."""
        multiple = self.meta.patch * 2 ** (len(self.unet.config.block_out_channels) - 1)
        return tuple(-(-side // multiple) * multiple for side in self.image_shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are."""
        return self.unet.device

    @property
    def num_parameters(self) -> int:
        """The UNet's parameter count."""
        return sum(p.numel() for p in self.unet.parameters())

    def set_data_range(self, lo: float, hi: float) -> None:
        """Fix the data range (saved with the generator; weights alone do not carry it)."""
        if not hi > lo:
            raise ValueError(f"data range must have hi > lo, got ({lo}, {hi})")
        self.meta = replace(self.meta, data_range=(float(lo), float(hi)))

    def to(self, device: str | torch.device) -> Generator:
        """Move the UNet to ``device``; returns self."""
        self.unet.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's weights: what a federated round sends."""
        return self.unet.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights from :meth:`state_dict` (the metadata stays this generator's)."""
        self.unet.load_state_dict(state)

    def sampling_scheduler(self, num_inference_steps: int) -> DDIMScheduler:
        """A DDIM scheduler on the training schedule, set to ``num_inference_steps`` steps."""
        # "trailing" starts at t = T-1; the default "leading" starts at T - T/steps, which leaves
        # noise the model never saw at t = T-1 unremoved (Lin et al. 2023, "Common diffusion noise
        # schedules and sample steps are flawed").
        scheduler = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised-space images (N, C, H, W) -> the UNet's padded, patched [-1, 1] space."""
        lo, hi = self.data_range or (-1.0, 1.0)
        x = (images.float() - lo) * (2.0 / (hi - lo)) - 1.0
        (height, width), (ph, pw) = self.image_shape[1:], self.padded_size
        if (ph, pw) != (height, width):
            x = F.pad(x, (0, pw - width, 0, ph - height), mode="replicate")
        return F.pixel_unshuffle(x, self.meta.patch) if self.meta.patch > 1 else x

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_model_space`: unpatch, crop the padding, map [-1, 1] back to the data range."""
        lo, hi = self.data_range or (-1.0, 1.0)
        _, height, width = self.image_shape
        if self.meta.patch > 1:
            x = F.pixel_shuffle(x, self.meta.patch)
        return (x[..., :height, :width] + 1.0) * ((hi - lo) / 2.0) + lo

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Save the UNet, the scheduler config and the metadata into folder ``path``.

        Written to a temporary sibling folder first and then renamed, so a killed save never
        leaves a half-written generator behind.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            self.unet.save_pretrained(tmp)
            self.scheduler.save_pretrained(tmp)
            (tmp / METADATA_FILE).write_text(json.dumps(asdict(self.meta), indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Generator:
        """Load a folder written by :meth:`save_pretrained` (or in the older layout), in eval mode."""
        folder = Path(path)
        # Without `accelerate` installed, the default low_cpu_mem_usage=True only logs a warning.
        unet = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False)
        if (folder / METADATA_FILE).is_file():
            meta = GeneratorMeta.from_dict(json.loads((folder / METADATA_FILE).read_text()))
            scheduler = DDPMScheduler.from_pretrained(folder)
        else:
            legacy = dict(unet.config)
            meta = GeneratorMeta.from_legacy(legacy)
            scheduler = DDPMScheduler(num_train_timesteps=int(legacy.get("num_train_timesteps") or NUM_TRAIN_TIMESTEPS),
                                      prediction_type=legacy.get(f"{_LEGACY_PREFIX}prediction") or "epsilon")
            # the metadata now lives in `meta`: a copy left in the UNet's config would go stale on a re-save
            unet._internal_dict = FrozenDict({k: v for k, v in legacy.items() if not k.startswith(_LEGACY_PREFIX)})
        unet.to(device).eval()
        return cls(unet, scheduler, meta)

    @staticmethod
    def is_saved(path: str | os.PathLike[str]) -> bool:
        """Whether folder ``path`` holds a saved generator (either layout)."""
        return (Path(path) / "config.json").is_file()
