"""The invocation message that travels from the gateway to the runtime."""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class InvocationMessage:
    """What a worker needs to run an invocation without asking the gateway.

    ``payload`` is the invocation's ``{"args": [...], "kwargs": {...}}``
    document as JSON bytes; it travels untouched, never parsed by the
    worker, which passes it on to the executor as is. On the wire the body
    is one line of JSON header, a newline, then the payload.
    """

    id: str
    tenant: str
    function: str
    version: int
    payload: bytes

    def encode(self) -> bytes:
        header = orjson.dumps(
            {
                "id": self.id,
                "tenant": self.tenant,
                "function": self.function,
                "version": self.version,
            }
        )
        return header + b"\n" + self.payload

    @classmethod
    def decode(cls, body: bytes) -> InvocationMessage:
        """Parse a message body; raises ValueError when it is not one."""
        header, separator, payload = body.partition(b"\n")
        try:
            if not separator:
                raise ValueError("no header line")
            doc = orjson.loads(header)
            return cls(
                id=str(doc["id"]),
                tenant=str(doc["tenant"]),
                function=str(doc["function"]),
                version=int(doc["version"]),
                payload=payload,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an invocation message: {exc}") from None
