"""Client-side algorithms by name: one file each, one line here."""

from __future__ import annotations

from clients.algorithms.base import ClientAlgorithm
from clients.algorithms.fednova import FedNovaClient
from clients.algorithms.fedproto import FedProtoClient
from clients.algorithms.fedprox import FedProxClient
from clients.algorithms.prototypes import PrototypeClient
from clients.algorithms.scaffold import ScaffoldClient
from clients.algorithms.climb import ClimbClient

CLIENT_ALGORITHMS: dict[str, type[ClientAlgorithm]] = {cls.name: cls for cls in (
    ClientAlgorithm,
    FedProxClient,
    ScaffoldClient,
    FedNovaClient,
    PrototypeClient,
    ClimbClient,
    FedProtoClient,
)}
