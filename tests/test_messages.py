"""The wire format of invocation messages and their bundles."""

from __future__ import annotations

import pytest

from conveyor_core.messages import InvocationMessage, decode_bundle, encode_bundle


def message(
    n: int, payload: bytes = b'{"args":[1]}', **changes: object
) -> InvocationMessage:
    fields = {
        "id": f"inv_{n}",
        "tenant": "acme",
        "function": "add",
        "version": 3,
        "payload": payload,
        **changes,
    }
    return InvocationMessage(**fields)  # type: ignore[arg-type]


def test_a_bundle_round_trips_payloads_byte_for_byte() -> None:
    payloads = [b'{"args":[1]}', b"", b'{"args":["\\n\xc3\xa9"]}', b"\n\n"]
    messages = [message(n, payload) for n, payload in enumerate(payloads)]
    assert decode_bundle(encode_bundle(messages)) == messages


def test_a_single_message_is_a_bundle_of_one() -> None:
    single = message(1)
    assert InvocationMessage.decode(single.encode()) == single
    assert decode_bundle(single.encode()) == [single]


def test_decoding_one_from_a_bundle_of_two_is_refused() -> None:
    with pytest.raises(ValueError, match="holds 2"):
        InvocationMessage.decode(encode_bundle([message(1), message(2)]))


@pytest.mark.parametrize(
    "change", [{"tenant": "other"}, {"function": "sub"}, {"version": 4}]
)
def test_a_bundle_holds_one_function_version(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="one function version"):
        encode_bundle([message(1), message(2, **change)])


def test_an_empty_bundle_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        encode_bundle([])


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no header line",
        b"{not json}\n",
        b'{"tenant":"a","function":"f","version":1}\n',
        b'{"tenant":"a","function":"f","version":1,"calls":[]}\n',
        b'{"tenant":"a","function":"f","version":1,"calls":[["i",5]]}\nabc',
        b'{"tenant":"a","function":"f","version":1,"calls":[["i",1]]}\nabc',
        b'{"tenant":"a","function":"f","version":1,"calls":[["i",-1]]}\n',
        b'{"tenant":"a","function":"f","version":"x","calls":[["i",0]]}\n',
        b'{"tenant":"a","function":"f","version":1,"calls":[["i"]]}\n',
    ],
)
def test_a_malformed_body_raises_value_error(body: bytes) -> None:
    with pytest.raises(ValueError, match="not an invocation message"):
        decode_bundle(body)
