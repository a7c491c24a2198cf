"""The invocation messages that travel from the gateway to the runtime.

One broker message carries a bundle of invocations of one function version:
a batch request is published as a few bundles rather than one message per
call, which divides the broker's cost per invocation by the bundle size. A
single invocation is a bundle of one.

On the wire a bundle is one line of JSON header, a newline, then the
payloads back to back; the header names each invocation with its payload's
length in bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class InvocationMessage:
    """What a worker needs to run an invocation without asking the gateway.

    ``payload`` is the invocation's ``{"args": [...], "kwargs": {...}}``
    document as JSON bytes; it travels untouched, never parsed by the
    worker, which passes it on to the executor as is.
    """

    id: str
    tenant: str
    function: str
    version: int
    payload: bytes

    def encode(self) -> bytes:
        """This invocation as a bundle of one."""
        return encode_bundle([self])

    @classmethod
    def decode(cls, body: bytes) -> InvocationMessage:
        """Parse a bundle of exactly one; raises ValueError otherwise."""
        messages = decode_bundle(body)
        if len(messages) != 1:
            raise ValueError(
                f"not a single invocation: the bundle holds {len(messages)}"
            )
        return messages[0]


def encode_bundle(messages: Sequence[InvocationMessage]) -> bytes:
    """One message body for invocations of the same function version."""
    if not messages:
        raise ValueError("a bundle needs at least one invocation")
    first = messages[0]
    target = (first.tenant, first.function, first.version)
    if any((m.tenant, m.function, m.version) != target for m in messages):
        raise ValueError("a bundle holds invocations of one function version only")
    header = orjson.dumps(
        {
            "tenant": first.tenant,
            "function": first.function,
            "version": first.version,
            "calls": [[m.id, len(m.payload)] for m in messages],
        }
    )
    return b"".join([header, b"\n", *(m.payload for m in messages)])


def decode_bundle(body: bytes) -> list[InvocationMessage]:
    """Parse a message body into its invocations; raises ValueError."""
    header, separator, payloads = body.partition(b"\n")
    try:
        if not separator:
            raise ValueError("no header line")
        doc = orjson.loads(header)
        tenant = str(doc["tenant"])
        function = str(doc["function"])
        version = int(doc["version"])
        calls = doc["calls"]
        if not isinstance(calls, list) or not calls:
            raise ValueError("no invocations in the bundle")

        messages = []
        offset = 0
        for invocation_id, size in calls:
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"payload size {size!r} is not a byte count")
            end = offset + size
            if end > len(payloads):
                raise ValueError("the payloads are shorter than the header says")
            messages.append(
                InvocationMessage(
                    str(invocation_id), tenant, function, version, payloads[offset:end]
                )
            )
            offset = end
        if offset != len(payloads):
            raise ValueError("the payloads are longer than the header says")
        return messages
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an invocation message: {exc}") from None
