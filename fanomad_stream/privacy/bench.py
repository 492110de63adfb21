"""Per-round cost of secure aggregation: client and server compute time and message sizes.

Run ``python -m fanomad_stream.privacy.bench`` to print one JSON line per configuration. It
runs the real protocol in memory (no Kafka) and sizes every message as the record codec
encodes it for the control topic.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from typing import Any

import numpy as np

from fanomad_stream.privacy.secagg import FixedPointCodec, SecAggClient, SecAggServer
from fanomad_stream.privacy.secagg.messages import SERVER_ID, Message
from fanomad_stream.transport import codec as record_codec


def benchmark_secagg(
    *,
    clients: int = 8,
    parameters: int = 1_000_000,
    dropouts_after_sharing: int = 0,
    threshold: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run one round and return timings in ms and message sizes in bytes per stage.

    Dropped clients share their keys but never send a masked input, which is the case that
    costs the server most: it must rebuild their masking keys and every pairwise mask.
    """
    ids = [f"edge-{i}" for i in range(clients)]
    threshold = threshold or clients // 2 + 1
    fixed_point = FixedPointCodec(clip_range=1.0, scale_bits=20, max_clients=clients)
    rng = np.random.default_rng(seed)
    server = SecAggServer(
        round_id=1,
        session="bench",
        threshold=threshold,
        clients=ids,
        vector_length=parameters,
        bits=fixed_point.bits,
    )
    participants = {}
    for client_id in ids:
        update = rng.uniform(-0.5, 0.5, parameters)
        encoded = fixed_point.encode(update, rng=rng).values
        participants[client_id] = SecAggClient(
            client_id=client_id,
            round_id=1,
            session="bench",
            threshold=threshold,
            encoded=encoded,
            bits=fixed_point.bits,
        )
    dropped = set(ids[:dropouts_after_sharing])

    times_ms: dict[str, list[float]] = defaultdict(list)
    sizes: dict[str, list[int]] = defaultdict(list)
    queue: deque[Message] = deque()

    def send(messages: list[Message]) -> None:
        for message in messages:
            if message["sender"] in dropped and message["stage"] == "masked_input":
                continue
            raw = record_codec.encode("control", message, src=message["sender"], ts=0.0)
            sizes[message["stage"]].append(len(raw))
            queue.append(message)

    for client in participants.values():
        send(client.start())
    while server.result is None and server.aborted_reason is None:
        if not queue:
            send(server.on_timeout())
            continue
        message = queue.popleft()
        started = time.perf_counter()
        if message["recipient"] == SERVER_ID:
            replies = server.handle(message)
            role = "server"
        else:
            replies = participants[message["recipient"]].handle(message)
            role = "client"
        times_ms[f"{role}:{message['stage']}"].append((time.perf_counter() - started) * 1e3)
        send(replies)

    return {
        "clients": clients,
        "parameters": parameters,
        "dropouts_after_sharing": dropouts_after_sharing,
        "threshold": threshold,
        "ring_bits": fixed_point.bits,
        "completed": server.result is not None,
        # Client handling of the routed shares decrypts them and builds the masked input.
        "client_masking_ms_mean": float(np.mean(times_ms["client:routed_shares"])),
        "client_key_sharing_ms_mean": float(np.mean(times_ms["client:key_list"])),
        # The last unmask message closes the stage, so its handling time is the unmasking.
        "server_unmasking_ms": float(max(times_ms["server:unmask"])),
        "server_total_ms": float(
            sum(sum(v) for k, v in times_ms.items() if k.startswith("server"))
        ),
        "bytes_per_message_mean": {stage: int(np.mean(v)) for stage, v in sizes.items()},
        "plain_update_float32_bytes": 4 * parameters,
    }


if __name__ == "__main__":
    for dropouts in (0, 1):
        print(json.dumps(benchmark_secagg(dropouts_after_sharing=dropouts)))
