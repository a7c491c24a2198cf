"""Records and the JSON codec they travel through."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conveyor_core import codec
from conveyor_core.records import Attempt, Invocation, State, new_id


def test_an_invocation_document_has_every_field_and_reads_back() -> None:
    invocation = Invocation(
        id="inv_1",
        tenant="acme",
        function="add",
        version=2,
        status=State.SUCCEEDED,
        created_at=1.5,
        started_at=2.5,
        finished_at=3.5,
        duration_ms=1000.0,
        result={"sum": [1, 2]},
        error=None,
        attempts=1,
        attempt_log=[Attempt(1, "host:1", 2.5, 3.5, "succeeded")],
        logs="out\n",
        logs_truncated=True,
        idempotency_key="k",
    )
    doc = invocation.to_doc()
    assert set(doc) == {f.name for f in dataclasses.fields(Invocation)}
    assert doc["status"] == "succeeded"
    assert doc["attempt_log"] == [dataclasses.asdict(invocation.attempt_log[0])]
    assert Invocation.from_doc(codec.loads(codec.dumps(doc))) == invocation


@pytest.mark.parametrize(
    "value",
    [
        2**64 - 1,
        2**64,
        -(2**63) - 1,
        10**40,
        {"nested": [3**50, "12345678901234567890123 in a string"]},
        1.0000000000000000000001,
        "é ✓",
    ],
)
def test_codec_reads_back_exactly_what_it_wrote(value: object) -> None:
    data = codec.dumps(value)
    assert codec.loads(data) == value
    assert codec.loads(data.decode()) == value
    assert type(codec.loads(data)) is type(value)


def test_codec_refuses_what_is_not_json() -> None:
    with pytest.raises(ValueError):
        codec.loads(b"{not json")
    with pytest.raises(TypeError):
        codec.dumps({1, 2})


def test_codec_reads_what_only_the_standard_library_accepts() -> None:
    assert json.dumps(codec.loads(b"[NaN]")) == "[NaN]"


def test_ids_made_in_a_row_sort_in_that_order() -> None:
    ids = [new_id("inv_") for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == len("inv_") + 26 for i in ids)
