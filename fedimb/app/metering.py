"""Bytes on the wire: what the server's messages and the clients' replies carry, per round."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedimb import protocol

REPLY_POLL_S = 0.25  # how often a deployed server asks the SuperLink for its replies


def payload_bytes(message: Message) -> int:
    """The bytes of a message's records (arrays, metrics, configs), without the transport's framing."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


class PartitionAssigner:
    """A Grid that, once told ``partition_of`` (simulation), puts each message's partition in its config.

    Flower's virtual nodes all reach the same data, so which node plays which partition is the
    server's choice: the i-th smallest node id plays partition i for the whole run. Every message
    gets its own copy of the config (Flower's strategies share one record between messages).
    Sits below :class:`MeteredGrid`, so byte counts stay those of a deployment.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.partition_of: dict[int, int] | None = None  # None: deployed sites say their own

    def _assign(self, messages: list[Message]) -> list[Message]:
        if self.partition_of is None:
            return messages
        for message in messages:
            content = RecordDict(dict(message.content.items()))
            config = ConfigRecord(dict(content[protocol.CONFIG].items())) if protocol.CONFIG in content else ConfigRecord()
            config[protocol.ASSIGNED_PARTITION] = self.partition_of[message.metadata.dst_node_id]
            content[protocol.CONFIG] = config
            message.content = content
        return messages

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's ``send_and_receive``, each message told its partition."""
        return self._grid.send_and_receive(self._assign(list(messages)), timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's ``push_messages``, each message told its partition."""
        return self._grid.push_messages(self._assign(list(messages)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


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
        replies = list(self._exchange(messages, timeout))
        self.received += sum(payload_bytes(m) for m in replies)
        return replies

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Push, then pull replies until all are in or ``timeout`` passes, as Flower's ``send_and_receive``
        does, but asking at the in-memory grid's own interval (simulation, 0.1 s) or every :data:`REPLY_POLL_S`
        (Flower's grid for a SuperLink asks every 3 s, which a deployed phase would wait on twice a round)."""
        poll_s = getattr(self._grid, "pull_interval", REPLY_POLL_S)
        waiting = set(self._grid.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            pulled = list(self._grid.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if not waiting:
                break
            time.sleep(poll_s)
        return replies

    def take(self) -> dict[str, int]:
        """The bytes since the last call, as the round's ``bytes_sent`` / ``bytes_received``."""
        counts = {"bytes_sent": self.sent, "bytes_received": self.received}
        self.sent = self.received = 0
        return counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
