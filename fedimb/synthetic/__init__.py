"""Class-conditional DDPM generator for synthetic minority samples (FedSSG), from diffusers parts.

``build_generator`` makes a ``UNet2DModel`` by size name, ``train_generator`` /
``sample`` are the short training and DDIM + classifier-free-guidance loops,
``save_generator`` / ``load_generator`` wrap ``save_pretrained`` / ``from_pretrained``, and
``quality`` holds the sample grid and the recognisability score.
"""

from fedimb.generation.diffusion import (
    from_model_space,
    load_generator,
    sample,
    sampling_scheduler,
    save_generator,
    to_model_space,
    train_generator,
    training_scheduler,
)
from fedimb.generation.model import (
    GENERATOR_SIZES,
    build_generator,
    data_range,
    image_channels,
    image_size,
    null_class,
    padded_size,
    patch_size,
    prediction_type,
    set_data_range,
)
from fedimb.generation.quality import recognisability, sample_grid, train_reference_classifier

__all__ = [
    "GENERATOR_SIZES",
    "build_generator",
    "data_range",
    "from_model_space",
    "image_channels",
    "image_size",
    "load_generator",
    "null_class",
    "padded_size",
    "patch_size",
    "prediction_type",
    "recognisability",
    "sample",
    "sample_grid",
    "sampling_scheduler",
    "save_generator",
    "set_data_range",
    "to_model_space",
    "train_generator",
    "train_reference_classifier",
    "training_scheduler",
]
