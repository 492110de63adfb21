"""Double-masking secure aggregation (Bonawitz et al., CCS 2017) as pure state machines.

``SecAggClient`` and ``SecAggServer`` take and return message dicts; the transport carries
them on a control topic keyed by recipient. ``FixedPointCodec`` turns float updates into ring
elements and the ring sum back into floats.
"""

from fanomad_stream.privacy.secagg.client import SecAggClient
from fanomad_stream.privacy.secagg.encoding import EncodedVector, FixedPointCodec
from fanomad_stream.privacy.secagg.messages import Message, ProtocolError, RoundAbortedError
from fanomad_stream.privacy.secagg.primitives import ShareDecryptionError
from fanomad_stream.privacy.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "EncodedVector",
    "FixedPointCodec",
    "Message",
    "ProtocolError",
    "RoundAbortedError",
    "SecAggClient",
    "SecAggResult",
    "SecAggServer",
    "ShareDecryptionError",
]
