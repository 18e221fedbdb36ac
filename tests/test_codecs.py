"""Codecs round-trip within their error bounds, reject every corrupted encoding with CodecError, and parse specs."""

from __future__ import annotations

import contextlib
import math
import struct
import time
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pnode.node.errors import BadInput
from p2pnode.protocol.codecs import (
    CODEC_NAMES,
    MAX_ELEMENTS,
    CodecError,
    Encoded,
    Int4Codec,
    Int8Codec,
    NoneCodec,
    TopKCodec,
    decode,
    get_codec,
    validate,
)

SPECS = ("none", "fp16", "bf16", "int8", "int8:3", "int4", "int4:3", "topk:0.1")
PROPERTY = settings(max_examples=60, deadline=None)

shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=8),
    st.tuples(st.integers(0, 700)),  # 1-D lengths around and past the default int8 block of 256
)


def tensors(dtype: str, max_abs: float | None = None) -> st.SearchStrategy[torch.Tensor]:
    """Finite tensors of `dtype` (subnormals included) and random shape, optionally bounded in magnitude."""
    width = 32 if dtype == "float32" else 64
    bound = {} if max_abs is None else {"min_value": -max_abs, "max_value": max_abs}
    elements = st.floats(width=width, allow_nan=False, allow_infinity=False, **bound)
    return hnp.arrays(np.dtype(dtype), shapes, elements=elements).map(torch.from_numpy)


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def check_shape_and_dtype(x: torch.Tensor, y: torch.Tensor) -> None:
    assert y.dtype == x.dtype
    assert y.shape == x.shape


@PROPERTY
@given(x=st.one_of(tensors("float32"), tensors("float64")))
def test_none_roundtrip_is_bitwise_exact(x: torch.Tensor) -> None:
    y = get_codec("none").roundtrip(x)
    check_shape_and_dtype(x, y)
    assert y.numpy().tobytes() == x.numpy().tobytes()


@PROPERTY
@given(x=st.one_of(tensors("float32", 6e4), tensors("float64", 6e4)))
def test_fp16_roundtrip_error_is_within_half_precision(x: torch.Tensor) -> None:
    y = get_codec("fp16").roundtrip(x)
    check_shape_and_dtype(x, y)
    # 2**-10 relative for normal fp16 values; 6e-8 absolute covers fp16 subnormals and underflow.
    assert (np.abs(as_f64(y) - as_f64(x)) <= 2**-10 * np.abs(as_f64(x)) + 6e-8).all()


@PROPERTY
@given(x=st.one_of(tensors("float32", 2.0**126), tensors("float64", 2.0**126)))
def test_bf16_roundtrip_error_is_within_bfloat16_precision(x: torch.Tensor) -> None:
    y = get_codec("bf16").roundtrip(x)
    check_shape_and_dtype(x, y)
    # 2**-133 is the bf16 subnormal spacing: the absolute error floor for values near zero.
    assert (np.abs(as_f64(y) - as_f64(x)) <= 2**-7 * np.abs(as_f64(x)) + 2.0**-133).all()


def blockwise_error_bound(x: torch.Tensor, block: int, levels: int = 127) -> np.ndarray:
    """Per element: half its block's scale max|x|/levels, plus float32 rounding of q * scale and of tiny scales."""
    flat = as_f64(x).reshape(-1)
    scales = np.zeros(flat.size)
    for start in range(0, flat.size, block):  # a plain reference loop, independent of the codec's vectorised one
        scales[start : start + block] = np.abs(flat[start : start + block]).max() / levels
    return scales / 2 * (1 + 2**-20) + 2**-23 * np.abs(flat) + 1e-42


@pytest.mark.parametrize("codec_class", [Int8Codec, Int4Codec])
@PROPERTY
@given(
    x=st.one_of(tensors("float32"), tensors("float64", 1e30)),
    block=st.sampled_from([1, 3, 16, 256]),
)
def test_blockwise_roundtrip_error_is_within_half_a_block_scale(codec_class, x: torch.Tensor, block: int) -> None:
    codec = codec_class(block)
    e = codec.encode(x)
    y = codec.decode(e)
    check_shape_and_dtype(x, y)
    assert e.meta == {"block": block}
    per_value = 1 if codec_class is Int8Codec else 0.5  # int4: two values a byte
    assert len(e.payload) == 4 * math.ceil(x.numel() / block) + math.ceil(per_value * x.numel())
    err = np.abs(as_f64(y) - as_f64(x)).reshape(-1)
    assert (err <= blockwise_error_bound(x, block, levels=codec.levels)).all()


def test_int4_payload_is_scales_then_two_values_a_byte_low_nibble_first() -> None:
    e = Int4Codec(3).encode(torch.tensor([0.9, -2.0, 0.5, 0.0, 0.0, 0.0, 7.0]))
    scales = np.frombuffer(e.payload, dtype="<f4", count=3)
    assert np.array_equal(scales, np.array([2 / 7, 0, 1], dtype=np.float32))
    # values 3, -7, 2, 0, 0, 0, 7; -7 is 0x9 in 4-bit two's complement; then a zero pad nibble
    assert e.payload[12:] == bytes([0x93, 0x02, 0x00, 0x07])


def test_int4_value_minus_8_and_a_non_zero_pad_nibble_are_rejected() -> None:
    e = Int4Codec(3).encode(torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 7.0]))
    assert_rejected(with_bytes(e, 12, bytes([0x84])), "-7 .. 7")
    assert_rejected(with_bytes(e, 15, bytes([0x17])), "padding nibble")


@pytest.mark.parametrize("block", [1, 256])
def test_int8_roundtrips_the_float32_extremes(block: int) -> None:
    top = float(np.finfo(np.float32).max)
    x = torch.tensor([top, -top, 1.0, -(2.0**-149)], dtype=torch.float32)
    y = Int8Codec(block).roundtrip(x)  # float32(max / 127) rounds up; 127 times it must not overflow
    assert (np.abs(as_f64(y) - as_f64(x)) <= blockwise_error_bound(x, block)).all()


def test_int8_refuses_float64_values_beyond_the_float32_range() -> None:
    with pytest.raises(CodecError, match="float32 range"):
        Int8Codec().encode(torch.tensor([1e39], dtype=torch.float64))


@PROPERTY
@given(
    x=st.one_of(tensors("float32"), tensors("float64")),
    fraction=st.sampled_from(["0.01", "0.1", "0.3", "0.5", "1"]),
)
def test_topk_keeps_exactly_the_k_largest_magnitudes(x: torch.Tensor, fraction: str) -> None:
    codec = get_codec(f"topk:{fraction}")
    e = codec.encode(x)
    y = codec.decode(e)
    check_shape_and_dtype(x, y)
    n = x.numel()
    k = e.meta["k"]
    assert k == (0 if n == 0 else max(1, math.ceil(Fraction(fraction) * n)))
    kept = np.frombuffer(e.payload, dtype="<i4", count=k)
    assert (np.diff(kept) > 0).all()
    flat_x, flat_y = x.reshape(-1).numpy(), y.reshape(-1).numpy()
    dropped = np.setdiff1d(np.arange(n), kept)
    assert np.array_equal(flat_y[kept], flat_x[kept])
    assert (flat_y[dropped] == 0).all()
    if k and dropped.size:
        assert np.abs(flat_x[kept]).min() >= np.abs(flat_x[dropped]).max()


def test_topk_count_uses_the_decimal_fraction_not_its_binary_float() -> None:
    # In binary floating point 0.07 * 100 = 7.000000000000001, whose ceil would keep 8 entries instead of 7.
    assert get_codec("topk:0.07").encode(torch.ones(100)).meta == {"k": 7}
    assert TopKCodec(0.07).k_for(100) == 7


def test_topk_of_float64_carries_float64_values() -> None:
    x = torch.tensor([1e-300, 2.0, -3.0], dtype=torch.float64)
    e = get_codec("topk:1").encode(x)
    assert e.nbytes == 3 * 4 + 3 * 8
    assert torch.equal(decode(e), x)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_decoded_tensor_has_the_original_dtype_and_shape(spec: str, dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = get_codec(spec).roundtrip(x)
    check_shape_and_dtype(x, y)
    assert float((y.double() - x.double()).norm()) <= float(x.double().norm())  # sane, not garbage


def test_int8_payload_is_scales_then_int8_values() -> None:
    e = Int8Codec(3).encode(torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 4.0]))
    scales = np.frombuffer(e.payload, dtype="<f4", count=3)
    values = np.frombuffer(e.payload, dtype=np.int8, offset=12)
    assert np.array_equal(scales, np.array([2 / 127, 0, 4 / 127], dtype=np.float32))
    assert values.tolist() == [64, -127, 32, 0, 0, 0, 127]  # 1 / (2/127) = 63.5 rounds to even 64


def test_fp16_and_bf16_payloads_are_little_endian_halves() -> None:
    assert get_codec("fp16").encode(torch.tensor([1.0, -2.0])).payload == struct.pack("<2e", 1.0, -2.0)
    assert get_codec("bf16").encode(torch.tensor([1.0])).payload == bytes([0x80, 0x3F])


def test_int8_encodes_and_decodes_a_large_tensor_in_milliseconds() -> None:
    x = torch.randn(1_800_000, generator=torch.Generator().manual_seed(0))
    codec = get_codec("int8")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        codec.roundtrip(x)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.25  # vectorised: ~10 ms; a Python loop over elements would take seconds


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", SPECS)
def test_encode_refuses_non_finite_values(spec: str, bad: float) -> None:
    with pytest.raises(CodecError, match="non-finite"):
        get_codec(spec).encode(torch.tensor([1.0, bad]))


def test_encode_refuses_values_outside_the_fp16_range() -> None:
    with pytest.raises(CodecError, match="fp16 range"):
        get_codec("fp16").encode(torch.tensor([7e4]))


def test_encode_refuses_integer_tensors() -> None:
    with pytest.raises(CodecError, match="dtype"):
        get_codec("none").encode(torch.arange(4))


# Corrupted encodings. Every case is a valid encoding of SAMPLE with one thing wrong.
SAMPLE = torch.randn(10, 100, generator=torch.Generator().manual_seed(1))


def encoded(spec: str, **changes: object) -> Encoded:
    return replace(get_codec(spec).encode(SAMPLE), **changes)


def with_bytes(e: Encoded, offset: int, data: bytes) -> Encoded:
    return replace(e, payload=e.payload[:offset] + data + e.payload[offset + len(data) :])


def assert_rejected(e: Encoded, match: str) -> None:
    with pytest.raises(CodecError, match=match) as info:
        decode(e)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", SPECS)
def test_valid_sample_encodings_decode(spec: str) -> None:  # the baseline the corruptions below start from
    validate(encoded(spec))
    assert decode(encoded(spec)).shape == SAMPLE.shape


@pytest.mark.parametrize("spec", SPECS)
def test_truncated_payload_is_rejected(spec: str) -> None:
    e = encoded(spec)
    assert_rejected(replace(e, payload=e.payload[:-1]), "payload is .* bytes, expected")
    assert_rejected(replace(e, payload=b""), "payload is 0 bytes")


@pytest.mark.parametrize("spec", SPECS)
def test_payload_with_extra_bytes_is_rejected(spec: str) -> None:
    e = encoded(spec)
    assert_rejected(replace(e, payload=e.payload + b"\0"), "expected")


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "int8"])
def test_shape_that_disagrees_with_the_payload_is_rejected(spec: str) -> None:
    assert_rejected(encoded(spec, shape=(10, 101)), "expected")
    assert_rejected(encoded(spec, shape=(10,)), "expected")


def test_topk_shape_too_small_for_its_indices_is_rejected() -> None:
    assert_rejected(encoded("topk:0.1", shape=(10, 9)), "topk")


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((10, -100), "shape entries"),
        ((True, 1000), "shape entries"),
        ((10.0, 100), "shape entries"),
        ([10, "100"], "shape entries"),
        ((2**20, 2**20), "more than"),
        ((1,) * 33, "dims"),
        ("10x100", "shape must be"),
    ],
)
def test_malformed_shape_is_rejected(shape: object, match: str) -> None:
    assert_rejected(encoded("none", shape=shape), match)


@pytest.mark.parametrize(
    ("spec", "offset", "data"),
    [
        ("none", 8, struct.pack("<f", float("nan"))),
        ("none", 0, struct.pack("<f", float("inf"))),
        ("fp16", 2, bytes([0x00, 0x7E])),  # fp16 NaN
        ("bf16", 4, bytes([0x80, 0xFF])),  # bf16 -inf
        ("int8", 0, struct.pack("<f", 3e38)),  # finite scale, but 127 * scale overflows float32
        ("topk:0.1", 4 * 100 + 4, struct.pack("<f", float("nan"))),  # the second kept value
    ],
)
def test_payload_decoding_to_nan_or_inf_is_rejected(spec: str, offset: int, data: bytes) -> None:
    bad = with_bytes(encoded(spec), offset, data)
    validate(bad)  # structurally fine: the values are checked when decoding
    assert_rejected(bad, "non-finite")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_int8_scale_that_is_not_finite_and_non_negative_is_rejected(scale: float) -> None:
    assert_rejected(with_bytes(encoded("int8"), 4, struct.pack("<f", scale)), "scales")


def test_int8_value_minus_128_is_rejected() -> None:
    e = encoded("int8")
    nblocks = math.ceil(SAMPLE.numel() / 256)
    assert_rejected(with_bytes(e, 4 * nblocks + 5, bytes([0x80])), "-127 .. 127")


def topk_indices(e: Encoded) -> np.ndarray:
    return np.frombuffer(e.payload, dtype="<i4", count=e.meta["k"]).copy()


def with_indices(e: Encoded, indices: np.ndarray) -> Encoded:
    return with_bytes(e, 0, indices.astype("<i4").tobytes())


@pytest.mark.parametrize("index", [1000, 2**31 - 1, -1])
def test_topk_index_out_of_range_is_rejected(index: int) -> None:
    e = encoded("topk:0.1")
    indices = topk_indices(e)
    indices[-1 if index >= 0 else 0] = index
    assert_rejected(with_indices(e, indices), "topk indices")


def test_topk_unsorted_indices_are_rejected() -> None:
    e = encoded("topk:0.1")
    indices = topk_indices(e)
    indices[[0, 1]] = indices[[1, 0]]
    assert_rejected(with_indices(e, indices), "strictly increasing")


def test_topk_repeated_index_is_rejected() -> None:
    e = encoded("topk:0.1")
    indices = topk_indices(e)
    indices[1] = indices[0]
    assert_rejected(with_indices(e, indices), "strictly increasing")


@pytest.mark.parametrize(
    ("spec", "meta", "match"),
    [
        ("int8", {"block": 0}, "block must be in"),
        ("int8", {"block": -256}, "block must be in"),
        ("int8", {"block": 2**40}, "block must be in"),
        ("int8", {"block": 128}, "expected"),  # valid value, but the payload has 256-blocks' scales
        ("int8", {"block": "256"}, "must be an int"),
        ("int8", {"block": True}, "must be an int"),
        ("int8", {}, "meta must have exactly block"),
        ("int8", {"block": 256, "k": 1}, "meta must have exactly block"),
        ("topk:0.1", {"k": 0}, "k must be in"),
        ("topk:0.1", {"k": 1001}, "k must be in"),
        ("topk:0.1", {"k": 99}, "expected"),
        ("topk:0.1", {"k": 100.0}, "must be an int"),
        ("none", {"block": 256}, "meta must have exactly no keys"),
        ("fp16", [], "meta must be a map"),
    ],
)
def test_bad_meta_is_rejected(spec: str, meta: object, match: str) -> None:
    assert_rejected(encoded(spec, meta=meta), match)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"codec": "zstd"}, "unknown codec 'zstd'"),
        ({"codec": None}, "unknown codec"),
        ({"dtype": "int32"}, "dtype 'int32'"),
        ({"payload": "text"}, "payload must be bytes"),
    ],
)
def test_unknown_codec_dtype_or_payload_type_is_rejected(changes: dict[str, object], match: str) -> None:
    assert_rejected(encoded("none", **changes), match)


def test_codec_refuses_to_decode_another_codecs_tensor() -> None:
    with pytest.raises(CodecError, match="fp16 codec cannot decode a 'none' tensor"):
        get_codec("fp16").decode(encoded("none"))


junk = st.none() | st.lists(st.integers(), max_size=2) | st.floats() | st.booleans()


@settings(max_examples=300, deadline=None)
@given(
    codec=st.sampled_from(["none", "fp16", "bf16", "int8", "topk", "zstd"]) | junk,
    dtype=st.sampled_from(["float32", "float64", "float16", "bfloat16", "int8"]) | junk,
    shape=st.lists(st.integers(-3, 40) | st.booleans() | st.floats(), max_size=3).map(tuple) | junk,
    meta=st.dictionaries(st.sampled_from(["block", "k", "x"]), st.integers(-(2**40), 2**40) | junk, max_size=2) | junk,
    payload=st.binary(max_size=300) | junk,
)
def test_arbitrary_encodings_raise_only_codec_error(
    codec: object, dtype: object, shape: object, meta: object, payload: object
) -> None:
    with contextlib.suppress(CodecError):
        decode(Encoded(codec, dtype, shape, payload, meta))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "cls", "param"),
    [
        ("none", NoneCodec, None),
        ("fp16", None, None),
        ("bf16", None, None),
        ("int8", Int8Codec, 256),
        ("int8:64", Int8Codec, 64),
        ("int4", Int4Codec, 256),
        ("int4:64", Int4Codec, 64),
        ("int8:1", Int8Codec, 1),
        ("topk:0.1", TopKCodec, Fraction(1, 10)),
        ("topk:1", TopKCodec, Fraction(1)),
        ("topk:1e-3", TopKCodec, Fraction(1, 1000)),
        (" topk:.25 ", TopKCodec, Fraction(1, 4)),
    ],
)
def test_get_codec_parses_valid_specs(spec: str, cls: type | None, param: object) -> None:
    codec = get_codec(spec)
    assert codec.name == spec.strip().split(":")[0]
    if cls in (Int8Codec, Int4Codec):
        assert codec.block == param
    if cls is TopKCodec:
        assert codec.fraction == param
    assert get_codec(codec.spec).spec == codec.spec  # the spec it reports parses back to itself


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "zstd",
        "NONE",
        "fp16:2",
        "int8:",
        "int8:0",
        "int8:-4",
        "int8:1.5",
        "int8:1_0",
        "int8:x",
        f"int8:{MAX_ELEMENTS + 1}",
        "int4:",
        "int4:0",
        "int16",
        "topk",
        "topk:",
        "topk:0",
        "topk:-0.1",
        "topk:1.01",
        "topk:nan",
        "topk:inf",
        "topk:1/2",
        None,
        7,
    ],
)
def test_get_codec_rejects_bad_specs_naming_the_valid_forms(spec: object) -> None:
    with pytest.raises(CodecError) as info:
        get_codec(spec)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    for form in ("none", "fp16", "bf16", "int8:BLOCK", "int4:BLOCK", "topk:FRACTION"):
        assert form in message
    assert isinstance(info.value, BadInput)  # so the CLI prints it without a traceback


def test_codec_names_list_every_spec_form() -> None:
    assert set(CODEC_NAMES) == {"none", "fp16", "bf16", "int8", "int8:BLOCK", "int4", "int4:BLOCK", "topk:FRACTION"}
