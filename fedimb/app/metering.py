"""Bytes on the wire: what the server's messages and the clients' replies carry, per round."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


def payload_bytes(message: Message) -> int:
    """The bytes of a message's records (arrays, metrics, configs), without the transport's framing."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


class MeteredGrid:
    """A Grid that counts the payload bytes it sends and receives; every other call goes to ``grid``.

    The same count in simulation and deployment, so the two can be compared message for message.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.sent = 0
        self.received = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's ``send_and_receive``, counting both directions."""
        messages = list(messages)
        self.sent += sum(payload_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received += sum(payload_bytes(m) for m in replies)
        return replies

    def take(self) -> dict[str, int]:
        """The bytes since the last call, as the round's ``bytes_sent`` / ``bytes_received``."""
        counts = {"bytes_sent": self.sent, "bytes_received": self.received}
        self.sent = self.received = 0
        return counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
