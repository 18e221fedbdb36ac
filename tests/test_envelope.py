"""Envelopes round-trip through msgpack, every malformed message is rejected with a reason, and no input crashes."""

from __future__ import annotations

import contextlib
import random
import string

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.node.algorithms.base import Message
from p2pnode.protocol.codecs import Encoded, decode, get_codec
from p2pnode.protocol.envelope import (
    KINDS,
    MAX_ITEMS,
    PROTOCOL_VERSION,
    Envelope,
    ProtocolError,
    decode_tensors,
    from_message,
    pack,
    to_message,
    unpack,
)

SPECS = ("none", "fp16", "bf16", "int8", "int8:5", "topk:0.25")
THETA = torch.arange(6, dtype=torch.float32).reshape(2, 3)


def make_env(**changes: object) -> Envelope:
    fields = {
        "run": "run-1",
        "epoch": 3,
        "round": 7,
        "phase": "mix",
        "seq": 11,
        "sender": "QmSender",
        "kind": "value",
        "tensors": {"theta": get_codec("none").encode(THETA)},
    }
    return Envelope(**{**fields, **changes})


def wire(**changes: object) -> dict:
    """The msgpack map of a valid envelope, with some fields replaced (or removed, for a value of DROP)."""
    obj = msgpack.unpackb(pack(make_env()), raw=False)
    obj.update(changes)
    return {key: value for key, value in obj.items() if value is not DROP}


def entry(**changes: object) -> dict:
    """The wire form of the valid "theta" tensor entry, with some fields replaced or removed."""
    obj = dict(wire()["t"][0], **changes)
    return {key: value for key, value in obj.items() if value is not DROP}


DROP = object()


def packb(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def rejects(data: bytes, match: str, **kwargs: object) -> str:
    with pytest.raises(ProtocolError, match=match) as info:
        unpack(data, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def unpack_fully(data: bytes) -> None:
    """What a receiver does with untrusted bytes; only ProtocolError may come out of it."""
    with contextlib.suppress(ProtocolError):
        decode_tensors(unpack(data))


# Round trips.

names = st.text(string.ascii_letters + string.digits + "_.", min_size=1, max_size=64)
small_tensors = st.builds(
    lambda shape, dtype, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype),
    shape=st.lists(st.integers(0, 6), max_size=3).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    spec=st.sampled_from(SPECS),
    tensors=st.dictionaries(names, small_tensors, max_size=3),
    header=st.tuples(*[st.integers(0, 2**62)] * 3),
    run=st.text(min_size=1, max_size=128),
    phase=st.text(min_size=1, max_size=32),
    sender=st.text(string.ascii_letters + string.digits, min_size=1, max_size=128),
)
def test_pack_unpack_roundtrip_for_every_codec_and_kind(
    kind: str, spec: str, tensors: dict, header: tuple, run: str, phase: str, sender: str
) -> None:
    codec = get_codec(spec)
    encoded = {name: codec.encode(t) for name, t in tensors.items()}
    env = Envelope(run, header[0], header[1], phase, header[2], sender, kind, encoded)
    back = unpack(pack(env), run=run, senders={sender})
    assert back == env
    assert back.nbytes == sum(e.nbytes for e in encoded.values())
    decoded = decode_tensors(back)
    assert list(decoded) == list(tensors)
    for name, t in decoded.items():
        assert torch.equal(t, decode(encoded[name]))
        assert t.dtype == tensors[name].dtype


def test_wire_form_is_a_map_with_short_keys() -> None:
    obj = msgpack.unpackb(pack(make_env()), raw=False)
    assert set(obj) == {"v", "run", "ep", "r", "ph", "seq", "from", "kind", "t"}
    assert obj["v"] == PROTOCOL_VERSION
    assert (obj["run"], obj["ep"], obj["r"], obj["ph"], obj["seq"], obj["from"]) == (
        "run-1",
        3,
        7,
        "mix",
        11,
        "QmSender",
    )
    [t] = obj["t"]
    assert t == {"n": "theta", "dt": "float32", "sh": [2, 3], "c": "none", "m": {}, "p": THETA.numpy().tobytes()}


def test_unpack_accepts_bytearray_and_memoryview() -> None:
    data = pack(make_env())
    assert unpack(bytearray(data)) == unpack(memoryview(data)) == make_env()


def test_message_conversion_roundtrip_encodes_tensors_and_keeps_encoded_ones() -> None:
    already = get_codec("int8").encode(torch.linspace(-1, 1, 50))
    msg = Message(src=2, dst=5, round=9, phase="push", kind="delta", tensors={"d": THETA, "e": already}, seq=4)
    env = from_message(msg, "run-1", 3, "QmSender", "fp16")
    assert (env.run, env.epoch, env.round, env.phase, env.seq, env.sender, env.kind) == (
        "run-1",
        3,
        9,
        "push",
        4,
        "QmSender",
        "delta",
    )
    assert env.tensors["d"].codec == "fp16"
    assert env.tensors["e"] is already
    back = to_message(unpack(pack(env)), src=2, dst=5)
    assert (back.src, back.dst, back.round, back.phase, back.kind, back.seq) == (2, 5, 9, "push", "delta", 4)
    assert torch.equal(back.tensors["d"], THETA)  # small integers are exact in fp16
    assert torch.equal(back.tensors["e"], decode(already))


def test_from_message_encodes_with_none_by_default() -> None:
    env = from_message(Message(0, 1, 0, "mix", "value", {"x": THETA}), "run-1", 0, "QmSender")
    assert env.tensors["x"].codec == "none"


# Rejections, one per reason.


def test_rejects_message_over_max_bytes_before_decoding() -> None:
    rejects(b"\xc1" * 100, "100 bytes, over the 50-byte limit", max_bytes=50)  # not msgpack, but size comes first
    data = pack(make_env())
    rejects(data, "over the", max_bytes=len(data) - 1)
    assert unpack(data, max_bytes=len(data)) == make_env()


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\xa2\xff\xfe", b"\x82\xa1v"], ids=["empty", "c1", "utf8", "truncated"]
)
def test_rejects_bytes_that_are_not_msgpack(data: bytes) -> None:
    rejects(data, "not valid msgpack")


def test_rejects_trailing_bytes_after_the_message() -> None:
    rejects(pack(make_env()) + b"\x00", "trailing")


def test_rejects_input_that_is_not_bytes() -> None:
    rejects("a string", "expected bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("obj", [[1, 2], "text", 5, None, b"bin"])
def test_rejects_message_that_is_not_a_map(obj: object) -> None:
    rejects(packb(obj), "must be a msgpack map")


def test_rejects_non_string_map_keys() -> None:
    rejects(packb({1: 2}), "not valid msgpack")


@pytest.mark.parametrize("field", ["v", "run", "ep", "r", "ph", "seq", "from", "kind", "t"])
def test_rejects_missing_field(field: str) -> None:
    rejects(packb(wire(**{field: DROP})), f"missing field '{field}'")


def test_rejects_extra_field() -> None:
    rejects(packb(wire(extra=1)), "unexpected field 'extra'")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("v", "1", r"'v' .*must be an integer, got a string"),
        ("ep", "3", r"'ep' .*must be an integer, got a string"),
        ("r", 1.0, r"'r' .*must be an integer, got a float"),
        ("seq", None, r"'seq' .*must be an integer, got nil"),
        ("run", 5, r"'run' .*must be a string, got an integer"),
        ("from", b"QmSender", r"'from' .*must be a string, got binary"),
        ("ph", ["mix"], r"'ph' .*must be a string, got an array"),
        ("t", {}, r"'t' .*must be an array, got a map"),
        ("kind", 1, "unknown kind 1"),
    ],
)
def test_rejects_mistyped_field(field: str, value: object, match: str) -> None:
    rejects(packb(wire(**{field: value})), match)


@pytest.mark.parametrize("field", ["v", "ep", "r", "seq"])
def test_rejects_booleans_where_integers_belong(field: str) -> None:
    rejects(packb(wire(**{field: True})), rf"'{field}' .*must be an integer, got a boolean")


@pytest.mark.parametrize("version", [0, 2, 77])
def test_rejects_other_protocol_versions_naming_the_version_received(version: int) -> None:
    message = rejects(packb(wire(v=version)), f"unsupported protocol version {version}")
    assert f"speaks version {PROTOCOL_VERSION}" in message


def test_version_is_checked_before_the_other_fields() -> None:
    rejects(packb({"v": 2, "a future field": 1}), "unsupported protocol version 2")


def test_rejects_message_from_another_run() -> None:
    rejects(pack(make_env()), "belongs to run 'run-1', not 'run-2'", run="run-2")
    assert unpack(pack(make_env()), run="run-1") == make_env()


def test_rejects_sender_not_among_the_accepted_peers() -> None:
    rejects(pack(make_env()), "sender 'QmSender' is not an accepted peer", senders={"QmOther"})
    rejects(pack(make_env()), "not an accepted peer", senders=[])
    assert unpack(pack(make_env()), senders=["QmOther", "QmSender"]) == make_env()


def test_rejects_unknown_kind() -> None:
    rejects(packb(wire(kind="gossip")), "unknown kind 'gossip': expected one of value, delta")


@pytest.mark.parametrize("field", ["ep", "r", "seq"])
@pytest.mark.parametrize("value", [-1, -(2**63), 2**62 + 1, 2**64 - 1])
def test_rejects_negative_or_absurd_integers(field: str, value: int) -> None:
    rejects(packb(wire(**{field: value})), rf"'{field}' .*out of range")


def test_accepts_integers_at_the_limit() -> None:
    assert unpack(packb(wire(ep=0, r=2**62, seq=2**62))).round == 2**62


@pytest.mark.parametrize(("phase", "match"), [("p" * 33, "1 to 32 characters, got 33"), ("", "got 0")])
def test_rejects_phase_that_is_not_a_short_string(phase: str, match: str) -> None:
    rejects(packb(wire(ph=phase)), match)


@pytest.mark.parametrize(("field", "limit"), [("run", 128), ("from", 128)])
def test_rejects_overlong_run_or_sender_ids(field: str, limit: int) -> None:
    rejects(packb(wire(**{field: "x" * (limit + 1)})), f"1 to {limit} characters")


def test_rejects_duplicate_tensor_names() -> None:
    rejects(packb(wire(t=[entry(), entry()])), "tensor name 'theta' appears twice")


@pytest.mark.parametrize(
    ("name", "match"),
    [(5, "name must be a string, got an integer"), ("n" * 65, "1 to 64 characters"), ("", "got 0")],
)
def test_rejects_tensor_names_that_are_not_short_strings(name: object, match: str) -> None:
    rejects(packb(wire(t=[entry(n=name)])), match)


@pytest.mark.parametrize(
    ("bad_entry", "match"),
    [
        ([1, 2], "tensor entry 0 must be a map, got an array"),
        (entry(p=DROP), "tensor entry 0 is missing field 'p'"),
        (entry(z=1), "tensor entry 0 has unexpected field 'z'"),
        (entry(p="text"), "tensor 'theta' payload has the wrong type: a string"),
        (entry(sh=6), "tensor 'theta' shape has the wrong type"),
        (entry(m=[]), "tensor 'theta' codec meta has the wrong type"),
        (entry(dt=4), "tensor 'theta' dtype has the wrong type"),
        (entry(c=None), "tensor 'theta' codec has the wrong type"),
    ],
)
def test_rejects_malformed_tensor_entries(bad_entry: object, match: str) -> None:
    rejects(packb(wire(t=[bad_entry])), match)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"p": THETA.numpy().tobytes()[:-1]}, "payload is 23 bytes, expected 24"),
        ({"p": THETA.numpy().tobytes() + b"\0"}, "payload is 25 bytes, expected 24"),
        ({"sh": [2, 4]}, "payload is 24 bytes, expected 32"),
        ({"sh": [2, -3]}, "shape entries"),
        ({"sh": [2, True]}, "shape entries"),
        ({"sh": [2**20, 2**20]}, "more than"),
        ({"dt": "int64"}, "dtype 'int64'"),
        ({"c": "zstd"}, "unknown codec 'zstd'"),
        ({"m": {"block": 4}}, "meta must have exactly no keys"),
    ],
)
def test_rejects_tensor_whose_declared_size_or_codec_disagrees_with_its_payload(changes: dict, match: str) -> None:
    message = rejects(packb(wire(t=[entry(**changes)])), match)
    assert message.startswith("tensor 'theta': ")


def test_rejects_topk_indices_out_of_range_at_unpack() -> None:
    e = get_codec("topk:0.5").encode(THETA)
    bad = e.payload[:8] + (6).to_bytes(4, "little") + e.payload[12:]
    bad_entry = {"n": "g", "dt": e.dtype, "sh": list(e.shape), "c": e.codec, "m": e.meta, "p": bad}
    rejects(packb(wire(t=[bad_entry])), "tensor 'g': topk indices")


def test_decode_tensors_rejects_payload_with_nan() -> None:
    nan_payload = torch.tensor([1.0, float("nan"), 0, 0, 0, 0]).numpy().tobytes()
    env = unpack(packb(wire(t=[entry(p=nan_payload)])))  # the size is right, so unpack accepts it
    with pytest.raises(ProtocolError, match=r"tensor 'theta': .*non-finite"):
        decode_tensors(env)
    with pytest.raises(ProtocolError, match="non-finite"):
        to_message(env, 0, 1)


def test_rejects_deeply_nested_containers() -> None:
    nested: list = []
    for _ in range(20):
        nested = [nested]
    rejects(packb(wire(t=nested)), "nests containers deeper than")


def test_rejects_too_many_objects_before_building_them() -> None:
    # 1 MB of one-byte empty arrays: unpacked naively, a million Python lists (about 60 MB).
    bomb = b"\xdc\x03\xe8" + (b"\xdc\x03\xe8" + b"\x90" * 1000) * 1000
    rejects(bomb, f"more than {MAX_ITEMS} msgpack objects")


def test_rejects_long_strings_and_arrays_at_the_msgpack_limits() -> None:
    rejects(packb(wire(run="x" * 10_000)), "not valid msgpack")
    rejects(packb(wire(t=[entry()] * 2000)), "not valid msgpack")


def test_pack_refuses_envelopes_a_receiver_would_reject() -> None:
    with pytest.raises(ProtocolError, match="unknown kind"):
        pack(make_env(kind="gossip"))
    with pytest.raises(ProtocolError, match="version"):
        pack(make_env(version=2))
    with pytest.raises(ProtocolError, match="'ph'"):
        pack(make_env(phase="p" * 33))
    bad = Encoded("none", "float32", (2, 3), b"\0" * 23, {})
    with pytest.raises(ProtocolError, match="tensor 'theta': none payload is 23 bytes"):
        pack(make_env(tensors={"theta": bad}))
    with pytest.raises(ProtocolError, match="over the"):
        pack(make_env(), max_bytes=10)


# Fuzzing: whatever the bytes, only ProtocolError comes out.

VALID = pack(make_env(tensors={spec: get_codec(spec).encode(torch.randn(3, 7, dtype=torch.float64)) for spec in SPECS}))


def test_random_byte_strings_raise_only_protocol_error() -> None:
    rng = random.Random(0)
    for i in range(3000):
        prefix = bytes([0x89]) if i % 2 else b""  # half start as a 9-entry map, to get past the first check
        unpack_fully(prefix + rng.randbytes(rng.randrange(0, 200)))


def test_every_truncation_of_a_valid_envelope_is_rejected() -> None:
    for end in range(len(VALID)):
        with pytest.raises(ProtocolError):
            unpack(VALID[:end])


def test_random_byte_flips_of_a_valid_envelope_raise_only_protocol_error() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        data = bytearray(VALID)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        unpack_fully(bytes(data))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5) | st.integers(0, 5), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(obj=msgpack_values)
def test_arbitrary_msgpack_values_raise_only_protocol_error(obj: object) -> None:
    with pytest.raises(ProtocolError):
        unpack(packb(obj))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["v", "run", "ep", "r", "ph", "seq", "from", "kind", "t"]), value=msgpack_values)
def test_any_value_in_any_header_field_raises_only_protocol_error(field: str, value: object) -> None:
    unpack_fully(packb(wire(**{field: value})))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["n", "dt", "sh", "c", "m", "p"]), value=msgpack_values)
def test_any_value_in_any_tensor_field_raises_only_protocol_error(field: str, value: object) -> None:
    unpack_fully(packb(wire(t=[entry(**{field: value})])))


def test_the_wire_format_package_imports_nothing_from_the_node_package():
    """`protocol/` is what peers of any version must agree on: it may not depend on `node/` (a loop
    between the two packages made the wire format change with the algorithms)."""
    import ast
    from pathlib import Path

    import p2pnode.protocol

    offenders = []
    for path in Path(p2pnode.protocol.__file__).parent.glob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom):
                names = [("." * n.level) + (n.module or "")]
            elif isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            else:
                continue
            offenders += [f"{path.name}: {m}" for m in names if m.startswith("..node") or m.startswith("p2pnode.node")]
    assert offenders == []
