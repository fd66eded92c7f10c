"""The protocol test vectors (docs/protocol-vectors.json) against the Python
framing and envelope code. zrpc-proto/tests/vectors.rs checks the same file
against the Rust implementation."""

import json
import math
import os

import pytest

from conftest import REPO
from zrpc import _proto, errors

with open(os.path.join(REPO, "docs", "protocol-vectors.json")) as f:
    VECTORS = json.load(f)

# The envelope table of docs/protocol.md: field names after the kind.
FIELDS = {
    1: ["version", "instance", "agent"],
    2: ["version", "conn_id", "max_message_size"],
    3: ["req", "name", "shared"],
    4: ["req", "name"],
    5: ["req", "code", "message"],
    6: ["id", "service", "method", "timeout_ms", "flags"],
    7: ["id", "service", "method", "timeout_ms", "caller_instance", "caller_call", "caller_uid", "caller_gid",
        "caller_pid"],
    8: ["id", "code", "message"],
    9: ["id", "code", "message"],
    10: ["id"],
    11: ["nonce"],
    12: ["nonce"],
    13: ["code", "message"],
    14: ["seq"],
}


@pytest.mark.parametrize("vec", VECTORS["frames"], ids=[v["name"] for v in VECTORS["frames"]])
def test_frame_decodes_to_its_meaning(vec):
    data = bytes.fromhex(vec["hex"])
    reader = _proto.FrameReader(_proto.DEFAULT_MAX_MESSAGE_SIZE)
    # Fed in two pieces: the reader must join a split frame.
    assert reader.feed(data[:5]) == []
    [(env, payload)] = reader.feed(data[5:])
    assert env[0] == vec["kind_code"]
    names = FIELDS[env[0]]
    known = env[1:1 + len(names)]
    assert dict(zip(names, known)) == vec["fields"]
    assert payload.hex() == vec["payload_hex"]
    if "payload" in vec:
        assert _proto.unpack(payload) == vec["payload"]
    if vec["canonical"]:
        assert _proto.encode_frame(env, payload) == data


def test_infinities_and_bin_in_a_payload():
    vec = next(v for v in VECTORS["frames"] if "inf" in v["name"])
    [(_, payload)] = _proto.FrameReader().feed(bytes.fromhex(vec["hex"]))
    value = _proto.unpack(payload)
    assert value["inf"] == math.inf and value["ninf"] == -math.inf and value["bin"] == b"\x00\xff"
    assert "cb7ff0000000000000" in payload.hex() and "cbfff0000000000000" in payload.hex()


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=[v["name"] for v in VECTORS["invalid"]])
def test_invalid_frame_is_rejected(vec):
    with pytest.raises(errors.ProtocolError):
        _proto.FrameReader().feed(bytes.fromhex(vec["hex"]))
