"""Tensor codecs for parameter messages: exact bytes, half precision, blockwise int8 and int4, and top-k
sparsification.

`Codec.encode` turns a float tensor into an `Encoded` (codec name, original dtype, shape, payload bytes, codec
parameters); `Codec.decode` checks every field of an `Encoded` against what its codec implies and rebuilds the
tensor in the original dtype. All payloads are little-endian. Decoding raises only `CodecError`, whatever the input.

Run `python -m p2pnode.protocol.codecs` to measure each codec on a 1.8M-element N(0, 1) float32 tensor.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import numpy as np
import torch

from .errors import BadInput

MAX_ELEMENTS = 2**28
MAX_NDIM = 32
DEFAULT_BLOCK = 256
CODEC_NAMES = ("none", "fp16", "bf16", "int8", "int8:BLOCK", "int4", "int4:BLOCK", "topk:FRACTION")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
_LITTLE_ENDIAN = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2"}
_F32_MAX = float(np.finfo(np.float32).max)
_SPEC_HELP = (
    "none, fp16, bf16, int8, int8:BLOCK, int4, int4:BLOCK (1 <= BLOCK <= 2**28), "
    "topk:FRACTION (0 < FRACTION <= 1, e.g. topk:0.1)"
)


class CodecError(ValueError):
    """A tensor that cannot be encoded, or an encoded tensor that is malformed or inconsistent."""


class CodecSpecError(CodecError, BadInput):
    """A bad codec spec from the user (a `BadInput` too, so the CLI prints it without a traceback)."""


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor. `dtype` is the dtype of the original tensor and of the decoded one."""

    codec: str
    dtype: str
    shape: tuple[int, ...]
    payload: bytes
    meta: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a CPU tensor in its own dtype."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    return t.numpy().astype(_LITTLE_ENDIAN[t.dtype], copy=False).tobytes()


def _array(buf: bytes, dtype: str, count: int, offset: int = 0) -> np.ndarray:
    """A writable native-endian copy of `count` values of numpy `dtype` read from `buf` at byte `offset`."""
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


def _from_bytes(buf: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A tensor of `count` little-endian values of `dtype` read from the start of `buf`."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(_array(buf, "<i2", count)).view(torch.bfloat16)
    return torch.from_numpy(_array(buf, _LITTLE_ENDIAN[dtype], count))


def _float_array(flat: torch.Tensor) -> np.ndarray:
    """float64 tensors as float64, every other float dtype as float32 (which holds fp16 and bf16 exactly)."""
    return (flat if flat.dtype == torch.float64 else flat.to(torch.float32)).numpy()


def _all_finite(t: torch.Tensor) -> bool:
    # numpy, not torch.isfinite(t).all(): several times faster on CPU (torch also lacks a fast bf16 path).
    if t.dtype == torch.bfloat16:
        return not ((t.view(torch.int16).numpy() & 0x7F80) == 0x7F80).any()  # exponent all ones: inf or NaN
    return bool(np.isfinite(t.numpy()).all())


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The tensor on the CPU, detached, and its dtype name; refuses what no receiver would accept."""
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(x).__name__}")
    dtype = _DTYPE_NAMES.get(x.dtype)
    if dtype is None:
        raise CodecError(f"cannot encode dtype {x.dtype}: expected one of {', '.join(TORCH_DTYPES)}")
    if x.dim() > MAX_NDIM or x.numel() > MAX_ELEMENTS:
        raise CodecError(f"tensor of shape {tuple(x.shape)} exceeds {MAX_NDIM} dims or {MAX_ELEMENTS} elements")
    x = x.detach().cpu()
    if not _all_finite(x):
        raise CodecError("cannot encode non-finite values (NaN or inf)")
    return x, dtype


def _check_shape(shape: object) -> int:
    """numel of a declared shape, after checking it is a short sequence of bounded non-negative ints."""
    if not isinstance(shape, (tuple, list)):
        raise CodecError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise CodecError(f"shape has {len(shape)} dims, more than {MAX_NDIM}")
    numel = 1
    for dim in shape:
        if not _is_int(dim) or not 0 <= dim <= MAX_ELEMENTS:
            raise CodecError(f"shape entries must be ints in 0 .. {MAX_ELEMENTS}, got {str(dim)[:40]}")
        numel *= dim
        if numel > MAX_ELEMENTS:
            raise CodecError(f"shape {tuple(shape)} has more than {MAX_ELEMENTS} elements")
    return numel


def _check_meta(meta: object, keys: tuple[str, ...]) -> None:
    if not isinstance(meta, dict):
        raise CodecError(f"meta must be a map, got {type(meta).__name__}")
    if set(meta) != set(keys):
        want = ", ".join(keys) or "no keys"
        got = ", ".join(map(str, meta))[:80] or "no keys"
        raise CodecError(f"meta must have exactly {want}, got {got}")
    for key in keys:
        if not _is_int(meta[key]):
            raise CodecError(f"meta {key!r} must be an int, got {type(meta[key]).__name__}")


def _check_length(e: Encoded, expected: int) -> None:
    if len(e.payload) != expected:
        raise CodecError(f"{e.codec} payload is {len(e.payload)} bytes, expected {expected} for shape {e.shape}")


class Codec(ABC):
    """Encodes tensors one way; decodes any `Encoded` of its own codec (parameters come from `meta`)."""

    name: ClassVar[str]

    @property
    def spec(self) -> str:
        """The `get_codec` spec that builds this codec."""
        return self.name

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"

    def encode(self, x: torch.Tensor) -> Encoded:
        x, dtype = _prepare(x)
        payload, meta = self._encode(x.reshape(-1))
        return Encoded(self.name, dtype, tuple(x.shape), payload, meta)

    def check(self, e: Encoded) -> int:
        """Validates everything but the decoded values being finite; returns the element count."""
        if not isinstance(e, Encoded):
            raise CodecError(f"expected an Encoded, got {type(e).__name__}")
        if e.codec != self.name:
            raise CodecError(f"{self.name} codec cannot decode a {str(e.codec)[:40]!r} tensor")
        if not isinstance(e.dtype, str) or e.dtype not in _ITEMSIZE:
            raise CodecError(f"dtype {str(e.dtype)[:40]!r} is not one of {', '.join(TORCH_DTYPES)}")
        numel = _check_shape(e.shape)
        if not isinstance(e.payload, bytes):
            raise CodecError(f"payload must be bytes, got {type(e.payload).__name__}")
        try:
            self._check(e, numel)
        except CodecError:
            raise
        except Exception as err:  # numpy on hostile bytes: surface as a CodecError, never anything else
            raise CodecError(f"malformed {self.name} payload: {err}") from None
        return numel

    def decode(self, e: Encoded) -> torch.Tensor:
        numel = self.check(e)
        try:
            with np.errstate(all="ignore"):  # overflow to inf is caught just below, not warned about
                flat = self._decode(e, numel)
            out = flat.to(TORCH_DTYPES[e.dtype]).reshape(tuple(e.shape))
        except Exception as err:  # as in check: nothing but CodecError leaves decode
            raise CodecError(f"cannot decode {self.name} payload: {err}") from None
        if not _all_finite(out):
            raise CodecError(f"{self.name} tensor decodes to non-finite values (NaN or inf)")
        return out

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @abstractmethod
    def _encode(self, flat: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        """Payload and meta for a finite, flat CPU tensor."""

    @abstractmethod
    def _check(self, e: Encoded, numel: int) -> None:
        """Meta and payload checks specific to this codec (dtype and shape are already valid)."""

    @abstractmethod
    def _decode(self, e: Encoded, numel: int) -> torch.Tensor:
        """The flat decoded tensor, in any float dtype (the caller casts it to `e.dtype`)."""


class NoneCodec(Codec):
    """The tensor's own bytes: exact."""

    name = "none"

    def _encode(self, flat: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        return _to_bytes(flat), {}

    def _check(self, e: Encoded, numel: int) -> None:
        _check_meta(e.meta, ())
        _check_length(e, numel * _ITEMSIZE[e.dtype])

    def _decode(self, e: Encoded, numel: int) -> torch.Tensor:
        return _from_bytes(e.payload, TORCH_DTYPES[e.dtype], numel)


class _HalfCodec(Codec):
    """Every value rounded to a 16-bit float type."""

    wire: ClassVar[torch.dtype]

    def _encode(self, flat: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        half = flat.to(self.wire)
        if not _all_finite(half):
            raise CodecError(f"values exceed the {self.name} range (max {torch.finfo(self.wire).max:.4g})")
        return _to_bytes(half), {}

    def _check(self, e: Encoded, numel: int) -> None:
        _check_meta(e.meta, ())
        _check_length(e, numel * 2)

    def _decode(self, e: Encoded, numel: int) -> torch.Tensor:
        return _from_bytes(e.payload, self.wire, numel)


class Fp16Codec(_HalfCodec):
    name = "fp16"
    wire = torch.float16


class Bf16Codec(_HalfCodec):
    name = "bf16"
    wire = torch.bfloat16


def _blocks(numel: int, block: int) -> tuple[int, int]:
    """(number of blocks, row length used to lay them out as a 2-D array).

    A block longer than the tensor is one block: laying it out with row length `numel` instead of `block`
    keeps a huge declared block from allocating a huge padded array.
    """
    row = max(1, min(block, numel))
    return -(-numel // row), row


class Int8Codec(Codec):
    """Blockwise absmax int8: per block one float32 scale = max|x| / 127, then round(x / scale) as int8."""

    name = "int8"
    levels: ClassVar[int] = 127  # values are round(x / scale) in -levels .. levels

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if not _is_int(block) or not 1 <= block <= MAX_ELEMENTS:
            raise CodecError(f"{self.name} block must be an int in 1 .. {MAX_ELEMENTS}, got {block!r}")
        self.block = block

    @property
    def spec(self) -> str:
        return self.name if self.block == DEFAULT_BLOCK else f"{self.name}:{self.block}"

    def max_scale(self) -> np.float32:
        """The largest scale whose levels * scale stays finite in float32 (float32(max / levels) may round up)."""
        return np.nextafter(np.float32(_F32_MAX / self.levels), np.float32(0))

    def value_bytes(self, numel: int) -> int:
        return numel

    def _pack(self, q: np.ndarray) -> bytes:
        return q.astype(np.int8).tobytes()

    def _unpack(self, payload: bytes, numel: int, offset: int) -> np.ndarray:
        return np.frombuffer(payload, dtype=np.int8, count=numel, offset=offset)

    def _values_in_range(self, payload: bytes, numel: int, offset: int) -> bool:
        return not (self._unpack(payload, numel, offset) == -128).any()

    def _encode(self, flat: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        values = _float_array(flat)
        nblocks, row = _blocks(values.size, self.block)
        rows = np.zeros(nblocks * row, dtype=values.dtype)
        rows[: values.size] = values
        rows = rows.reshape(nblocks, row)
        amax = np.abs(rows).max(axis=1)
        if amax.size and amax.max() > _F32_MAX:
            raise CodecError(f"{self.name} cannot encode values beyond the float32 range (max |x| = {amax.max():.3g})")
        scales = np.minimum((amax / self.levels).astype(np.float32), self.max_scale())
        # An all-zero block has scale 0; dividing by 1 there keeps q = 0 (also for float64 values so tiny that
        # their float32 scale underflows to 0).
        q = rows / np.where(scales > 0, scales, 1).astype(values.dtype)[:, None]
        np.clip(np.rint(q, out=q), -self.levels, self.levels, out=q)
        return scales.astype("<f4").tobytes() + self._pack(q.reshape(-1)[: values.size]), {"block": self.block}

    def _check(self, e: Encoded, numel: int) -> None:
        _check_meta(e.meta, ("block",))
        block = e.meta["block"]
        if not 1 <= block <= MAX_ELEMENTS:
            raise CodecError(f"{self.name} block must be in 1 .. {MAX_ELEMENTS}, got {block}")
        nblocks, _ = _blocks(numel, block)
        _check_length(e, 4 * nblocks + self.value_bytes(numel))
        scales = np.frombuffer(e.payload, dtype="<f4", count=nblocks)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError(f"{self.name} scales must be finite and non-negative")
        if not self._values_in_range(e.payload, numel, 4 * nblocks):
            raise CodecError(f"{self.name} values must be in -{self.levels} .. {self.levels}")

    def _decode(self, e: Encoded, numel: int) -> torch.Tensor:
        nblocks, row = _blocks(numel, e.meta["block"])
        # float64 keeps q * scale exact (8-bit times 24-bit mantissas) for float64 tensors.
        work = np.float64 if e.dtype == "float64" else np.float32
        rows = np.zeros(nblocks * row, dtype=work)
        rows[:numel] = self._unpack(e.payload, numel, 4 * nblocks)
        rows = rows.reshape(nblocks, row)
        rows *= np.frombuffer(e.payload, dtype="<f4", count=nblocks).astype(work)[:, None]
        return torch.from_numpy(rows.reshape(-1)[:numel])


class Int4Codec(Int8Codec):
    """Blockwise absmax int4: per block one float32 scale = max|x| / 7, then round(x / scale) in -7 .. 7 as
    4-bit two's complement, two values a byte (the first in the low nibble; an odd count pads a zero nibble)."""

    name = "int4"
    levels: ClassVar[int] = 7

    def value_bytes(self, numel: int) -> int:
        return (numel + 1) // 2

    def _pack(self, q: np.ndarray) -> bytes:
        nibbles = np.zeros(2 * self.value_bytes(q.size), dtype=np.uint8)
        nibbles[: q.size] = q.astype(np.int8).view(np.uint8) & 0x0F
        return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()

    def _unpack(self, payload: bytes, numel: int, offset: int) -> np.ndarray:
        packed = np.frombuffer(payload, dtype=np.uint8, count=self.value_bytes(numel), offset=offset)
        nibbles = np.empty(2 * packed.size, dtype=np.int8)
        nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
        nibbles ^= 8  # 4-bit two's complement to int8: flip the sign bit, then subtract it
        nibbles -= 8
        return nibbles[:numel]

    def _values_in_range(self, payload: bytes, numel: int, offset: int) -> bool:
        packed = np.frombuffer(payload, dtype=np.uint8, count=self.value_bytes(numel), offset=offset)
        if numel % 2 and packed[-1] >> 4:
            raise CodecError("int4 padding nibble after an odd count must be 0")
        return not ((packed & 0x0F) == 8).any() and not ((packed >> 4) == 8).any()  # nibble 8 is -8


def _exact_fraction(fraction: float | str | Fraction) -> Fraction:
    """The decimal the user wrote, exactly: in floats 0.07 * 100 is 7.000000000000001, and ceil would keep 8."""
    try:
        return Fraction(fraction) if isinstance(fraction, (str, Fraction)) else Fraction(repr(float(fraction)))
    except (ValueError, TypeError, OverflowError, ZeroDivisionError):
        raise CodecError(f"topk fraction must be a number in (0, 1], got {fraction!r}") from None


class TopKCodec(Codec):
    """The k = max(1, ceil(fraction * numel)) entries of largest magnitude: int32 indices, then their values."""

    name = "topk"

    def __init__(self, fraction: float | str | Fraction = 0.1) -> None:
        exact = _exact_fraction(fraction)
        if not 0 < exact <= 1:
            raise CodecError(f"topk fraction must be in (0, 1], got {fraction!r}")
        self.fraction = exact

    @property
    def spec(self) -> str:
        return f"{self.name}:{float(self.fraction)!r}"

    def k_for(self, numel: int) -> int:
        """How many entries a tensor of `numel` elements keeps (0 only for an empty tensor)."""
        return min(numel, max(1, math.ceil(self.fraction * numel)))

    def _encode(self, flat: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        values = _float_array(flat)
        k = self.k_for(values.size)
        if k == 0:
            return b"", {"k": 0}
        # argpartition puts the k largest magnitudes (ties broken arbitrarily) after position size - k.
        kept = np.sort(np.argpartition(np.abs(values), values.size - k)[values.size - k :])
        return kept.astype("<i4").tobytes() + values[kept].astype(values.dtype.newbyteorder("<")).tobytes(), {"k": k}

    def _check(self, e: Encoded, numel: int) -> None:
        _check_meta(e.meta, ("k",))
        k = e.meta["k"]
        if not (1 <= k <= numel or k == numel == 0):
            raise CodecError(f"topk k must be in 1 .. numel ({numel}), got {k}")
        _check_length(e, k * (4 + (8 if e.dtype == "float64" else 4)))
        indices = np.frombuffer(e.payload, dtype="<i4", count=k).astype(np.int64)
        if k and (indices[0] < 0 or indices[-1] >= numel or not (np.diff(indices) > 0).all()):
            raise CodecError(f"topk indices must be strictly increasing and in 0 .. {numel - 1}")

    def _decode(self, e: Encoded, numel: int) -> torch.Tensor:
        k = e.meta["k"]
        work = "<f8" if e.dtype == "float64" else "<f4"
        out = np.zeros(numel, dtype=np.dtype(work).newbyteorder("="))
        out[_array(e.payload, "<i4", k)] = np.frombuffer(e.payload, dtype=work, count=k, offset=4 * k)
        return torch.from_numpy(out)


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoneCodec, Fp16Codec, Bf16Codec, Int8Codec, Int4Codec, TopKCodec)}
_DECODERS: dict[str, Codec] = {name: cls() for name, cls in CODECS.items()}
_DECIMAL = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def get_codec(spec: str) -> Codec:
    """Parse `none`, `fp16`, `bf16`, `int8`, `int8:BLOCK`, `int4`, `int4:BLOCK` or `topk:FRACTION` into a codec."""
    bad = CodecSpecError(f"bad codec spec {str(spec)[:40]!r}: use one of {_SPEC_HELP}")
    if not isinstance(spec, str):
        raise bad
    name, sep, arg = spec.strip().partition(":")
    try:
        if name in ("none", "fp16", "bf16") and not sep:
            return CODECS[name]()
        if name in ("int8", "int4") and not sep:
            return CODECS[name]()
        if name in ("int8", "int4") and arg.isascii() and arg.isdigit():
            return CODECS[name](int(arg))
        if name == "topk" and _DECIMAL.fullmatch(arg):
            return TopKCodec(arg)
    except CodecError:
        raise bad from None
    raise bad


def codec_of(e: Encoded) -> Codec:
    """The codec that decodes `e` (its parameters come from `e.meta`)."""
    codec = _DECODERS.get(e.codec) if isinstance(e, Encoded) and isinstance(e.codec, str) else None
    if codec is None:
        known = ", ".join(CODECS)
        raise CodecError(f"unknown codec {str(getattr(e, 'codec', e))[:40]!r}: expected one of {known}")
    return codec


def validate(e: Encoded) -> None:
    """Every structural check of `decode` (codec, dtype, shape, meta, payload size, topk indices, int8 scales)."""
    codec_of(e).check(e)


def decode(e: Encoded) -> torch.Tensor:
    """Decode with whichever codec `e` names; raises only CodecError."""
    return codec_of(e).decode(e)


def _median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(
    numel: int = 1_800_000,
    specs: tuple[str, ...] = ("none", "fp16", "bf16", "int8", "int8:64", "topk:0.1", "topk:0.01"),
) -> str:
    """A markdown table of each codec's size, error and speed on an N(0, 1) float32 tensor."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    raw = numel * 4
    lines = [
        f"N(0, 1) float32 tensor, {numel} elements ({raw} bytes raw), {torch.get_num_threads()} torch threads;"
        " times are medians of 5 runs.",
        "",
        "| codec | payload bytes | vs raw float32 | relative L2 error | max abs error | encode ms | decode ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for spec in specs:
        codec = get_codec(spec)
        e = codec.encode(x)
        y = codec.decode(e)
        rel = float(torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x))
        worst = float((y - x).abs().max())
        enc = _median_ms(lambda codec=codec: codec.encode(x))
        dec = _median_ms(lambda codec=codec, e=e: codec.decode(e))
        lines.append(
            f"| `{spec}` | {e.nbytes} | {e.nbytes / raw:.3f} | {rel:.2e} | {worst:.2e} | {enc:.1f} | {dec:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(measure())
