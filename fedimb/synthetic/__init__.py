"""Synthetic minority samples (FedSSG) from a class-conditional DDPM generator built of diffusers parts.

* ``generator``: :class:`~fedimb.synthetic.generator.Generator`, the UNet, its DDPM scheduler
  and its metadata (``build``, ``train``, ``sample``, ``save_pretrained`` / ``from_pretrained``);
* ``diffusion``: the training and sampling loops behind ``Generator.train`` / ``Generator.sample``;
* ``topup``: what server and clients share: how many samples per class, the per-class
  ``ClassSampler``, pools, the judge's count, training and caching from the config;
* ``quality``: the sample grid and the recognisability score.

The package imports nothing itself, so that ``topup`` loads without diffusers (every client
imports it; only the synthetic phase needs a generator). Flower messages live in
``fedimb.app.synthetic`` (server) and ``clients.synthetic`` (client).
"""
