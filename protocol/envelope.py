"""The versioned msgpack envelope one peer sends another, and every check a receiver runs before trusting it.

`pack` validates and serialises an `Envelope`; `unpack` bounds, parses and validates bytes from the network and
raises only `ProtocolError` (a one-line reason) for anything it rejects. The receiver logs that reason and drops
the message. See docs/protocol.md for the field-by-field layout.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import msgpack
import torch

from .codecs import Codec, CodecError, Encoded, Int8Codec, TopKCodec, decode, get_codec, validate
from .message import Message

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 2**20
KINDS = ("value", "delta", "total", "copy", "params", "hello")
MAX_INT = 2**62
MAX_ID_LEN = 128  # run id and sender peer id, in characters
MAX_PHASE_LEN = 32
MAX_NAME_LEN = 64  # tensor names
MAX_TENSORS = 1024
MAX_ITEMS = 65536  # msgpack objects in one message (a valid one has about 20 + 20 per tensor)
MAX_DEPTH = 8  # nested containers (a valid message nests 4: message, tensor list, tensor entry, shape)
_MAX_STR_BYTES = 4 * MAX_ID_LEN  # utf-8 takes up to 4 bytes a character
_MAX_MAP_LEN = 32

_FIELDS = {
    "v": "protocol version",
    "run": "run id",
    "ep": "topology epoch",
    "r": "round",
    "ph": "phase",
    "seq": "sequence number",
    "from": "sender",
    "kind": "kind",
    "t": "tensors",
}
_TENSOR_FIELDS = {"n": "name", "dt": "dtype", "sh": "shape", "c": "codec", "m": "codec meta", "p": "payload"}

# msgpack first bytes (https://github.com/msgpack/msgpack/blob/master/spec.md) for the pre-scan in `_scan`.
_FIXED_SIZE = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED_SIZE |= {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin and str: width of the length field
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext: length field, one type byte, data
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # width of the count, objects per entry
# msgpack bytes around the payloads, counted generously: every header field at its longest (about 1.3 kB), and per
# tensor its entry keys, a 64-character name, dtype, codec, meta and bin header (about 0.3 kB) plus 9 bytes a dim.
_ENVELOPE_OVERHEAD = 2048
_TENSOR_OVERHEAD = 512


class ProtocolError(ValueError):
    """A message this node will not accept (or send); the message is one line saying why."""


@dataclass
class Envelope:
    """One message on the wire: routing header plus encoded tensors."""

    run: str
    epoch: int
    round: int
    phase: str
    seq: int
    sender: str
    kind: str
    tensors: dict[str, Encoded]
    version: int = PROTOCOL_VERSION

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", bytes: "binary"}
    names |= {list: "an array", dict: "a map", type(None): "nil"}
    return names.get(type(value), type(value).__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _label(key: str) -> str:
    return f"field {key!r} ({_FIELDS[key]})"


def _check_int(value: object, label: str) -> int:
    if not _is_int(value):
        raise ProtocolError(f"{label} must be an integer, got {_type(value)}")
    if not 0 <= value <= MAX_INT:
        raise ProtocolError(f"{label} is out of range: {_show(value)} (allowed 0 .. 2**62)")
    return value


def _check_str(value: object, label: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{label} must be a string, got {_type(value)}")
    if not 1 <= len(value) <= max_len:
        raise ProtocolError(f"{label} must be 1 to {max_len} characters, got {len(value)}")
    return value


def _check_keys(obj: dict, expected: dict[str, str], where: str) -> None:
    missing = [key for key in expected if key not in obj]
    if missing:
        raise ProtocolError(f"{where} is missing field {missing[0]!r} ({expected[missing[0]]})")
    extra = sorted(_show(key) for key in obj if key not in expected)
    if extra:
        raise ProtocolError(f"{where} has unexpected field {extra[0]}")


def _check_header(env: Envelope) -> None:
    """The checks on the header fields shared by `pack` and `unpack` (the version is checked by the caller)."""
    _check_str(env.run, _label("run"), MAX_ID_LEN)
    _check_int(env.epoch, _label("ep"))
    _check_int(env.round, _label("r"))
    _check_str(env.phase, _label("ph"), MAX_PHASE_LEN)
    _check_int(env.seq, _label("seq"))
    _check_str(env.sender, _label("from"), MAX_ID_LEN)
    if env.kind not in KINDS:
        raise ProtocolError(f"unknown kind {_show(env.kind)}: expected one of {', '.join(KINDS)}")
    if len(env.tensors) > MAX_TENSORS:
        raise ProtocolError(f"message has {len(env.tensors)} tensors, more than {MAX_TENSORS}")


def _check_tensor(name: str, e: Encoded) -> None:
    try:
        validate(e)
    except CodecError as err:
        raise ProtocolError(f"tensor {name!r}: {err}") from None


def pack(env: Envelope, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Validate `env` as a receiver would (all but the decoded values) and serialise it."""
    if not isinstance(env, Envelope):
        raise ProtocolError(f"expected an Envelope, got {type(env).__name__}")
    if env.version != PROTOCOL_VERSION:
        raise ProtocolError(f"cannot send protocol version {_show(env.version)} (this node speaks {PROTOCOL_VERSION})")
    _check_header(env)
    entries = []
    for name, e in env.tensors.items():
        _check_str(name, "tensor name", MAX_NAME_LEN)
        _check_tensor(name, e)
        entries.append({"n": name, "dt": e.dtype, "sh": list(e.shape), "c": e.codec, "m": e.meta, "p": e.payload})
    wire = {
        "v": env.version,
        "run": env.run,
        "ep": env.epoch,
        "r": env.round,
        "ph": env.phase,
        "seq": env.seq,
        "from": env.sender,
        "kind": env.kind,
        "t": entries,
    }
    data = msgpack.packb(wire, use_bin_type=True)
    if len(data) > max_bytes:
        raise ProtocolError(f"message is {len(data)} bytes, over the {max_bytes}-byte limit")
    return data


def _scan(data: bytes) -> None:
    """Walk the msgpack headers without building objects, bounding the object count and nesting depth.

    msgpack.unpackb builds a Python list for every one-byte nested array, so without this pre-scan a hostile
    message of N bytes could cost about 60 N bytes of memory before any field check ran.
    """
    pos, end, items = 0, len(data), 0
    pending = [1]  # objects still expected by each open container; the root is a container of one
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        items += 1
        if items > MAX_ITEMS:
            raise ProtocolError(f"message has more than {MAX_ITEMS} msgpack objects")
        if pos >= end:
            raise ProtocolError("not valid msgpack: truncated")
        head = data[pos]
        pos += 1
        children = 0
        if head <= 0x7F or head >= 0xE0:  # positive or negative fixint
            pass
        elif head <= 0x8F:
            children = 2 * (head & 0x0F)
        elif head <= 0x9F:
            children = head & 0x0F
        elif head <= 0xBF:
            pos += head & 0x1F
        elif head in _FIXED_SIZE:
            pos += _FIXED_SIZE[head]
        elif head in _SIZED or head in _EXT:
            width = _SIZED.get(head) or _EXT[head]
            pos += width + int.from_bytes(data[pos : pos + width], "big") + (1 if head in _EXT else 0)
        elif head in _CONTAINERS:
            width, per_entry = _CONTAINERS[head]
            children = per_entry * int.from_bytes(data[pos : pos + width], "big")
            pos += width
        else:
            raise ProtocolError(f"not valid msgpack: byte 0x{head:02x} at offset {pos - 1}")
        if children:
            if len(pending) > MAX_DEPTH:
                raise ProtocolError(f"message nests containers deeper than {MAX_DEPTH}")
            pending.append(children)
    if pos > end:
        raise ProtocolError("not valid msgpack: truncated")
    if pos < end:
        raise ProtocolError(f"not valid msgpack: {end - pos} bytes of trailing data")


def _tensor_from_wire(entry: object, index: int) -> tuple[str, Encoded]:
    where = f"tensor entry {index}"
    if not isinstance(entry, dict):
        raise ProtocolError(f"{where} must be a map, got {_type(entry)}")
    _check_keys(entry, _TENSOR_FIELDS, where)
    name = _check_str(entry["n"], f"{where} name", MAX_NAME_LEN)
    expected = {"dt": str, "sh": list, "c": str, "m": dict, "p": bytes}
    for key, kind in expected.items():
        if not isinstance(entry[key], kind):
            raise ProtocolError(f"tensor {name!r} {_TENSOR_FIELDS[key]} has the wrong type: {_type(entry[key])}")
    e = Encoded(codec=entry["c"], dtype=entry["dt"], shape=tuple(entry["sh"]), payload=entry["p"], meta=entry["m"])
    _check_tensor(name, e)
    return name, e


def _from_wire(obj: object, run: str | None, senders: Collection[str] | None) -> Envelope:
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a msgpack map, got {_type(obj)}")
    if "v" not in obj:
        raise ProtocolError("message is missing field 'v' (protocol version)")
    version = _check_int(obj["v"], _label("v"))
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this node speaks version {PROTOCOL_VERSION})")
    _check_keys(obj, _FIELDS, "message")
    header = [obj[key] for key in ("run", "ep", "r", "ph", "seq", "from", "kind")]
    env = Envelope(*header, tensors={})
    _check_header(env)
    if run is not None and env.run != run:
        raise ProtocolError(f"message belongs to run {_show(env.run)}, not {_show(run)}")
    if senders is not None and env.sender not in senders:
        raise ProtocolError(f"sender {_show(env.sender)} is not an accepted peer")
    if not isinstance(obj["t"], list):
        raise ProtocolError(f"{_label('t')} must be an array, got {_type(obj['t'])}")
    for index, entry in enumerate(obj["t"]):
        name, e = _tensor_from_wire(entry, index)
        if name in env.tensors:
            raise ProtocolError(f"tensor name {name!r} appears twice")
        env.tensors[name] = e
    return env


def unpack(
    data: bytes,
    *,
    run: str | None = None,
    senders: Collection[str] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Envelope:
    """Parse and fully validate a message (all but its decoded values being finite); raises only ProtocolError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise ProtocolError(f"message is {size} bytes, over the {max_bytes}-byte limit")
    data = bytes(data)
    _scan(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max(0, max_bytes),
            max_str_len=_MAX_STR_BYTES,
            max_array_len=MAX_TENSORS,
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as err:  # msgpack raises ValueError subclasses, UnicodeDecodeError, TypeError, ...
        raise ProtocolError(f"not valid msgpack: {type(err).__name__}: {_show(str(err))}") from None
    return _from_wire(obj, run, senders)


def decode_tensors(env: Envelope) -> dict[str, torch.Tensor]:
    """The envelope's tensors, decoded; a payload that decodes to NaN or inf raises ProtocolError."""
    tensors = {}
    for name, e in env.tensors.items():
        try:
            tensors[name] = decode(e)
        except CodecError as err:
            raise ProtocolError(f"tensor {name!r}: {err}") from None
    return tensors


def _payload_bound(codec: Codec, numel: int, itemsize: int) -> int:
    """The most payload bytes `codec` makes of `numel` elements of at most `itemsize` bytes each."""
    if isinstance(codec, Int8Codec):  # and Int4Codec
        return 4 * -(-numel // max(1, min(codec.block, numel))) + codec.value_bytes(numel)
    if isinstance(codec, TopKCodec):
        return codec.k_for(numel) * (4 + itemsize)
    return (2 if codec.name in ("fp16", "bf16") else itemsize) * numel


def max_frame_bytes(shapes: Mapping[str, tuple[int, ...]], codec: Codec | str = "none", itemsize: int = 8) -> int:
    """The largest packed envelope whose tensors have these shapes, each encoded with `codec` or sent raw.

    Raw tensors count `itemsize` bytes an element: 8 covers float64 (running-sum totals and SGP weights go
    uncompressed in float64). A receiver refuses a length header above this before reading the frame."""
    coder = codec if isinstance(codec, Codec) else get_codec(codec)
    total = _ENVELOPE_OVERHEAD
    for shape in shapes.values():
        numel = math.prod(shape)
        total += _TENSOR_OVERHEAD + 9 * len(shape) + max(itemsize * numel, _payload_bound(coder, numel, itemsize))
    return total


def from_message(msg: Message, run: str, epoch: int, sender: str, codec: Codec | str = "none") -> Envelope:
    """Wrap an in-memory message: torch tensors are encoded with `codec`, `Encoded` ones are kept as they are."""
    coder = codec if isinstance(codec, Codec) else get_codec(codec)
    tensors = {name: t if isinstance(t, Encoded) else coder.encode(t) for name, t in msg.tensors.items()}
    return Envelope(run, epoch, msg.round, msg.phase, msg.seq, sender, msg.kind, tensors)


def to_message(env: Envelope, src: int, dst: int) -> Message:
    """The in-memory message for an unpacked envelope, with decoded tensors; `src`/`dst` are node indices."""
    return Message(src, dst, env.round, env.phase, env.kind, decode_tensors(env), env.seq, env.epoch)
