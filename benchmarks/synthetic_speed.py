"""Speed of the diffusion generator sizes on 1×28×28, 10 classes: training and guided DDIM sampling.

    python -m benchmarks.synthetic_speed                       # all sizes, torch's default threads
    python -m benchmarks.synthetic_speed --sizes cpu --threads 1

Short measurements (a few batches each, after one warm-up), so numbers are indicative. The
table: size, parameters, training samples/s at batch 64 (forward + backward + AdamW + EMA),
DDIM steps, sampling images/s with classifier-free guidance (2 UNet passes per step, batched
together), torch threads and device.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedimb.synthetic.generator import GENERATOR_SIZES, Generator

SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(size: str, train_batches: int, num_images: int, ddim_steps: int, device: str) -> dict[str, float]:
    """Parameters, training samples/s at batch 64 and guided sampling images/s for one size."""
    generator = Generator.build(size, SHAPE, NUM_CLASSES).to(device)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn((512, *SHAPE), generator=gen), torch.randint(NUM_CLASSES, (512,), generator=gen)
    generator.train(images, labels, steps=1)  # warm-up: allocator, oneDNN kernels
    train_s = _timed(lambda: generator.train(images, labels, steps=train_batches))
    wanted = torch.arange(num_images) % NUM_CLASSES
    generator.sample(wanted[:8], num_inference_steps=2)
    sample_s = _timed(lambda: generator.sample(wanted, guidance_scale=2.0, num_inference_steps=ddim_steps))
    return {
        "params": generator.num_parameters,
        "train_per_s": train_batches * 64 / train_s,
        "sample_per_s": num_images / sample_s,
    }


def main() -> int:
    """Measure the chosen sizes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(GENERATOR_SIZES), choices=list(GENERATOR_SIZES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--train-batches", type=int, default=5)
    parser.add_argument("--num-images", type=int, default=128, help="images sampled for the timing (one batch)")
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    header = (f"{'size':<6} {'params':>11} {'train samples/s':>16} {'DDIM steps':>10} "
              f"{'sample img/s':>13} {'threads':>7}  device")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        row = measure(size, args.train_batches, args.num_images, args.ddim_steps, args.device)
        print(f"{size:<6} {row['params']:>11,} {row['train_per_s']:>16.1f} {args.ddim_steps:>10} "
              f"{row['sample_per_s']:>13.1f} {torch.get_num_threads():>7}  {args.device}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
