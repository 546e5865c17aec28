"""Active-learning query samplers by name: one file each, one line here."""

from __future__ import annotations

from typing import Any

from clients.samplers import badge, coreset, entropy, fairfal, kafal, least_confidence, logo, margin, random
from clients.samplers.base import QueryContext, SamplerResult, SamplerSpec
from fedimb.config import build_params, registered

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    random.SAMPLER,
    entropy.SAMPLER,
    margin.SAMPLER,
    least_confidence.SAMPLER,
    coreset.SAMPLER,
    badge.SAMPLER,
    logo.SAMPLER,
    kafal.SAMPLER,
    fairfal.SAMPLER,
)}

__all__ = ["SAMPLERS", "QueryContext", "SamplerResult", "SamplerSpec", "build_sampler"]


def build_sampler(name: str, params: dict[str, Any]) -> tuple[SamplerSpec, Any]:
    """The sampler registered as ``name`` and its checked params."""
    spec = registered(SAMPLERS, name, "active_learning.sampler")
    return spec, build_params(spec.params_cls, params, "active_learning.sampler_params")
