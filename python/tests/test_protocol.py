import json

import pytest
from conftest import REPO

from memwarden import protocol as P

CASES = json.loads((REPO / "fixtures" / "protocol" / "cases.json").read_text())


def test_the_golden_set_is_there():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case_decodes_as_specified(case):
    if case["expect"] == "error":
        with pytest.raises(P.ProtocolError) as e:
            P.decode(case["line"])
        assert e.value.code == case["code"]
        assert e.value.request_id == case.get("requestId")
        return
    msg = P.decode(case["line"])
    assert msg.kind == case["expect"]
    for k, v in case.get("fields", {}).items():
        assert msg.body[k] == v, k
    # Encoding and decoding again gives the same message.
    assert P.decode(P.encode(msg.body)).body == msg.body
    if "errorCode" in case:
        assert msg.body["error"]["code"] == case["errorCode"]
    if msg.kind == "hello":
        if "handshake" in case:
            with pytest.raises(P.ProtocolError) as e:
                P.check_hello(msg)
            assert e.value.code == case["handshake"]
        else:
            P.check_hello(msg)
    if "dataType" in case:
        if case.get("dataError"):
            with pytest.raises(P.ProtocolError) as e:
                P.check_data(case["dataType"], msg.data)
            assert e.value.code == P.INVALID_DATA
        else:
            P.check_data(case["dataType"], msg.data)


def test_encoded_lines_stay_single_lines():
    line = P.encode(P.error("r\n1", P.LOAD_FAILED, "one\ntwo"))
    assert "\n" not in line
    assert P.decode(line).body["error"]["message"] == "one\ntwo"


def test_timestamps_round_trip_in_the_rust_form():
    t = P.timestamp()
    assert t.endswith("Z") and "T" in t
    assert P.parse_timestamp(t).utcoffset().total_seconds() == 0
    with pytest.raises(ValueError):
        P.parse_timestamp("2026-11-26T12:00:00")  # no offset: refused
