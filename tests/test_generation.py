"""The diffusion generator: shapes, label conditioning, save/load, quality helpers (tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedimb.config import ConfigError
from fedimb.synthetic.generator import GENERATOR_SIZES, Generator
from fedimb.synthetic.quality import recognisability, sample_grid, train_reference_classifier


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: more threads only add overhead, and the tests share the machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def halves(n: int, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright left half; class 1: bright right half; dark elsewhere, a little noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = -0.5 + 0.1 * torch.randn((n, 1, size, size), generator=gen)
    images[labels == 0, :, :, : size // 2] += 2.0
    images[labels == 1, :, :, size // 2 :] += 2.0
    return images, labels


@pytest.fixture(scope="module")
def trained() -> Generator:
    """The "cpu" generator trained for a few steps on the two half-bright classes (8×8)."""
    generator = Generator.build("cpu", (1, 8, 8), num_classes=2)
    images, labels = halves(64)
    loss = generator.train(images, labels, steps=300, batch_size=32)
    assert math.isfinite(loss) and loss < 0.2
    return generator


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 12, 12)])
def test_sample_shape_and_dtype(shape):
    generator = Generator.build("cpu", shape, num_classes=3, data_range=(-1.0, 2.0))
    assert generator.null_class == 3
    labels = torch.tensor([0, 1, 2, 2, 1])
    out = generator.sample(labels, num_inference_steps=2, batch_size=2)
    assert out.shape == (5, *shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size, shape", [("cpu", (1, 28, 28)), ("cpu", (1, 10, 10)), ("cpu28", (1, 28, 28)),
                                         ("cpu", (3, 12, 12))])
def test_model_space_round_trip(size, shape):
    """Patching (space-to-depth), padding and the range map are undone exactly on the way back."""
    generator = Generator.build(size, shape, num_classes=2, data_range=(-0.5, 3.0))
    images = torch.rand((4, *shape)) * 3.5 - 0.5
    inside = generator.to_model_space(images)
    patch = generator.meta.patch
    assert inside.shape[1] == generator.unet.config.in_channels == shape[0] * patch * patch
    assert inside.min() >= -1.0 - 1e-6 and inside.max() <= 1.0 + 1e-6
    assert torch.allclose(generator.from_model_space(inside), images, atol=1e-5)


def test_odd_size_is_padded_and_cropped():
    generator = Generator.build("small", (1, 10, 10), num_classes=2)  # 3 levels need multiples of 4
    images, labels = halves(8, size=10)
    generator.train(images, labels, steps=2, batch_size=4)
    assert generator.sample(labels[:3], num_inference_steps=2).shape == (3, 1, 10, 10)


def test_unknown_size_names_the_field():
    with pytest.raises(ConfigError, match="synthetic.generator_size.*cpu"):
        Generator.build("huge", (1, 28, 28), 10)


def test_bad_inputs_are_refused():
    generator = Generator.build("cpu", (1, 8, 8), num_classes=2)
    images, labels = halves(4)
    with pytest.raises(ValueError, match="labels must lie in"):
        generator.sample(torch.tensor([3]))
    with pytest.raises(ValueError, match="no data range"):
        generator.sample(torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        generator.train(images[:, :, :4], labels, steps=1)


def test_same_seed_same_init():
    a, b = Generator.build("cpu", (1, 8, 8), 2, seed=4), Generator.build("cpu", (1, 8, 8), 2, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))
    assert set(GENERATOR_SIZES) >= {"cpu", "small", "gpu"}


def test_gpu_size_trains_and_samples_at_fmnist_shape():
    """The GPU-sized UNet (attention, ~16M parameters) runs end to end on 1×28×28 (here on the CPU)."""
    generator = Generator.build("gpu", (1, 28, 28), num_classes=10, prediction="v_prediction")
    assert generator.num_parameters > 10_000_000
    images, labels = torch.randn((4, 1, 28, 28)), torch.tensor([0, 3, 7, 9])
    before = [p.detach().clone() for p in generator.unet.parameters()]
    generator.train(images, labels, steps=1, batch_size=4, ema_decay=0.0)
    assert any(not torch.equal(p, q) for p, q in zip(generator.unet.parameters(), before))
    out = generator.sample(labels[:2], guidance_scale=2.5, guidance_rescale=1.0, num_inference_steps=2)
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def assert_halves_follow_labels(generator: Generator) -> torch.Tensor:
    """16 guided samples per class of ``halves``: ≥ 90% bright on their class's side. Returns them."""
    labels = torch.tensor([0] * 16 + [1] * 16)
    out = generator.sample(labels, guidance_scale=2.0, num_inference_steps=10)
    left_minus_right = out[..., :4].mean((1, 2, 3)) - out[..., 4:].mean((1, 2, 3))
    assert (left_minus_right[:16] > 0).float().mean() >= 0.9
    assert (left_minus_right[16:] < 0).float().mean() >= 0.9
    return out


def test_samples_follow_their_label(trained):
    out = assert_halves_follow_labels(trained)
    # Samples come back in the data's space, not the UNet's [-1, 1].
    lo, hi = trained.data_range
    assert out.max() > 1.0 and lo < out.mean() < hi


def test_sampling_is_seeded_and_batch_size_free(trained):
    labels = torch.tensor([0, 1, 0, 1, 1])
    a = trained.sample(labels, num_inference_steps=4, seed=3, batch_size=5)
    b = trained.sample(labels, num_inference_steps=4, seed=3, batch_size=2)
    c = trained.sample(labels, num_inference_steps=4, seed=4, batch_size=5)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)


def test_guidance_interval_and_rescale(trained):
    labels = torch.tensor([0, 1, 0, 1])
    plain = trained.sample(labels, guidance_scale=1.0, num_inference_steps=5, seed=2)
    guided = trained.sample(labels, guidance_scale=3.0, num_inference_steps=5, seed=2)
    # An empty interval (no step has t <= 0) leaves every step plain conditional.
    never = trained.sample(labels, guidance_scale=3.0, num_inference_steps=5, seed=2, guidance_interval=(0.0, 0.0))
    assert torch.allclose(never, plain, atol=1e-5) and not torch.allclose(guided, plain, atol=1e-3)
    # phi 0 is plain guidance; phi 1 still follows the labels but changes the images.
    assert torch.equal(trained.sample(labels, guidance_scale=3.0, num_inference_steps=5, seed=2,
                                      guidance_rescale=0.0), guided)
    rescaled = trained.sample(labels, guidance_scale=3.0, num_inference_steps=5, seed=2, guidance_rescale=1.0)
    assert not torch.allclose(rescaled, guided, atol=1e-3)
    left_minus_right = rescaled[..., :4].mean((1, 2, 3)) - rescaled[..., 4:].mean((1, 2, 3))
    assert (left_minus_right[[0, 2]] > 0).all() and (left_minus_right[[1, 3]] < 0).all()


def test_a_sampler_per_label_changes_only_its_labels(trained):
    labels = torch.tensor([0, 1, 0, 1])
    plain = trained.sample(labels, guidance_scale=1.5, num_inference_steps=4, seed=5)
    strong = trained.sample(labels, guidance_scale=3.0, num_inference_steps=4, seed=5, guidance_rescale=1.0)
    # class 1 sampled strongly, class 0 plainly: each image equals its own sampler's, the noise is shared
    mixed = trained.sample(labels, guidance_scale=torch.tensor([1.5, 3.0, 1.5, 3.0]), num_inference_steps=4, seed=5,
                           guidance_rescale=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(mixed[[0, 2]], plain[[0, 2]], atol=1e-5)
    assert torch.allclose(mixed[[1, 3]], strong[[1, 3]], atol=1e-5)
    assert not torch.allclose(plain[[1, 3]], strong[[1, 3]], atol=1e-3)
    with pytest.raises(ValueError, match="guidance_scale has 3 values for 4 labels"):
        trained.sample(labels, guidance_scale=torch.tensor([1.0, 2.0, 3.0]), num_inference_steps=2)


def test_rescale_matches_the_conditional_std():
    from fedimb.synthetic.diffusion import _rescaled

    gen = torch.Generator().manual_seed(0)
    cond, guided = torch.randn((3, 2, 4, 4), generator=gen), 5 * torch.randn((3, 2, 4, 4), generator=gen)
    full = _rescaled(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5)
    half = _rescaled(guided, cond, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided)
    assert torch.equal(_rescaled(guided, cond, 0.0), guided)


def test_state_dict_transfer_needs_the_shared_range(trained):
    # Federated rounds move weights only: a copy built with the same range samples the same.
    copy = Generator.build("cpu", (1, 8, 8), num_classes=2, data_range=trained.data_range)
    copy.load_state_dict(trained.state_dict())
    labels = torch.tensor([0, 1])
    assert torch.equal(copy.sample(labels, num_inference_steps=3), trained.sample(labels, num_inference_steps=3))


def test_save_load_round_trip(trained, tmp_path):
    trained.save_pretrained(tmp_path / "gen")
    trained.save_pretrained(tmp_path / "gen")  # overwriting an existing generator is fine
    assert {p.name for p in (tmp_path / "gen").iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "generator_config.json"
    }
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.data_range == trained.data_range and loaded.meta == trained.meta
    assert loaded.scheduler.config.num_train_timesteps == trained.scheduler.config.num_train_timesteps
    assert not any(key.startswith("_fedimb") for key in loaded.unet.config)  # the metadata has its own file
    labels = torch.tensor([0, 1, 1])
    assert torch.equal(trained.sample(labels, num_inference_steps=4), loaded.sample(labels, num_inference_steps=4))


def test_v_prediction_generator_follows_labels_and_survives_save_load(tmp_path):
    generator = Generator.build("cpu", (1, 8, 8), num_classes=2, prediction="v_prediction")
    images, labels = halves(64)
    generator.train(images, labels, steps=300, batch_size=32, snr_gamma=5.0)
    generator.save_pretrained(tmp_path / "gen")
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.prediction == "v_prediction"
    assert_halves_follow_labels(loaded)


def test_a_folder_in_the_older_layout_loads(trained, tmp_path):
    """Generators cached before generator_config.json kept their metadata in the UNet's config."""
    legacy = Generator.build("cpu", (1, 8, 8), num_classes=2, prediction="v_prediction")
    legacy.load_state_dict(trained.state_dict())
    lo, hi = trained.data_range
    # what the older save wrote: private keys in the UNet's config, the scheduler's own file beside it
    legacy.unet.register_to_config(_fedimb_data_range=[lo, hi], _fedimb_image_shape=[1, 8, 8], _fedimb_patch=2,
                                   _fedimb_prediction="v_prediction")
    legacy.unet.save_pretrained(tmp_path / "old")
    legacy.scheduler.save_pretrained(tmp_path / "old")
    loaded = Generator.from_pretrained(tmp_path / "old")
    assert loaded.meta.image_shape == (1, 8, 8) and loaded.meta.patch == 2 and loaded.data_range == (lo, hi)
    assert loaded.prediction == "v_prediction" and loaded.meta.size is None
    assert not any(key.startswith("_fedimb") for key in loaded.unet.config)  # a re-save writes them once, apart
    legacy.set_data_range(lo, hi)
    labels = torch.tensor([0, 1])
    assert torch.equal(loaded.sample(labels, num_inference_steps=3), legacy.sample(labels, num_inference_steps=3))
    loaded.save_pretrained(tmp_path / "new")
    assert Generator.from_pretrained(tmp_path / "new").meta == loaded.meta


def test_unknown_prediction_names_the_field():
    with pytest.raises(ConfigError, match="synthetic.prediction.*v_prediction"):
        Generator.build("cpu", (1, 8, 8), 2, prediction="x0")


def test_sample_grid_writes_png(tmp_path):
    images, labels = halves(10)
    path = sample_grid(images, labels, num_classes=3, path=tmp_path / "grid.png", per_class=4,
                       class_names=["left", "right", "none"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FixedLogits(nn.Module):
    """Predicts class 0 for the first `n_zero` images of every batch, class 1 after."""

    def __init__(self, n_zero: int) -> None:
        super().__init__()
        self.n_zero = n_zero
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 3)
        logits[: self.n_zero, 0] = 1.0
        logits[self.n_zero :, 1] = 1.0
        return logits


def test_recognisability_hand_case():
    images = torch.zeros(6, 1, 8, 8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # Predictions: 0 0 1 1 1 1 -> class 0: 2/3 right, class 1: 3/3, class 2: no samples.
    scores = recognisability(FixedLogits(2), images, labels, num_classes=3)
    assert scores[:2] == pytest.approx([2 / 3, 1.0]) and math.isnan(scores[2])


def test_reference_classifier_learns_the_halves():
    images, labels = halves(128)
    clf = train_reference_classifier(images, labels, num_classes=2, epochs=2)
    assert recognisability(clf, *halves(32, seed=1), num_classes=2) == [1.0, 1.0]
