"""In-memory transport for one secure aggregation round, for tests and benchmarks.

It delivers messages in order, as a Kafka topic keyed by recipient would, and lets clients
drop out before a chosen stage. When no message is left in flight and the server still waits,
the stage timeout fires.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Mapping

from fanomad_stream.privacy.secagg.client import SecAggClient
from fanomad_stream.privacy.secagg.messages import SERVER_ID, Message, RoundAbortedError
from fanomad_stream.privacy.secagg.server import SecAggServer


def run_local_round(
    server: SecAggServer,
    clients: Mapping[str, SecAggClient],
    *,
    drop_before: Mapping[str, str] | None = None,
    duplicate: bool = False,
    wire: Callable[[Message], Message] | None = None,
) -> list[Message]:
    """Run a round to its end and return every message the server received.

    Parameters
    ----------
    server, clients
        The round's participants, clients keyed by id.
    drop_before
        Client id to the client stage (``advertise_keys``, ``share_keys``, ``masked_input``
        or ``unmask``) that the client never sends; it sends nothing from then on.
    duplicate
        Deliver every message twice, as an at-least-once transport may.
    wire
        Applied to every message before delivery, for example an encode and decode through
        the record codec.
    """
    drop_before = dict(drop_before or {})
    stopped: set[str] = set()
    queue: deque[Message] = deque()
    delivered_to_server: list[Message] = []

    def send(messages: list[Message]) -> None:
        for message in messages:
            sender = message["sender"]
            if sender != SERVER_ID and (
                sender in stopped or drop_before.get(sender) == message["stage"]
            ):
                stopped.add(sender)
                continue
            delivered = wire(message) if wire else message
            queue.extend([delivered, delivered] if duplicate else [delivered])

    for client_id, client in clients.items():
        if drop_before.get(client_id) == "advertise_keys":
            stopped.add(client_id)
            continue
        send(client.start())
    while server.result is None and server.aborted_reason is None:
        if not queue:
            send(server.on_timeout())
            continue
        message = queue.popleft()
        recipient = message["recipient"]
        if recipient == SERVER_ID:
            delivered_to_server.append(message)
            send(server.handle(message))
        elif recipient not in stopped:
            with contextlib.suppress(RoundAbortedError):
                send(clients[recipient].handle(message))
    # Abort messages are still in flight when the server gives up; hand them over.
    for message in queue:
        if message["recipient"] in clients and message["recipient"] not in stopped:
            with contextlib.suppress(RoundAbortedError):
                clients[message["recipient"]].handle(message)
    return delivered_to_server
