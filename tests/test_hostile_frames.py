"""Whatever an admitted member sends, a running node neither raises nor lets a frame it cannot apply into
a round (the brief: bad network messages never crash a running daemon).

Hypothesis draws frames a hostile member could build: from every piece the protocol knows (any phase,
kind, tensor names, shapes, dtypes, sequence numbers, rounds), and from an honest in-neighbour's real
messages with one field changed (values up to 1e300, NaN and inf written raw, the codec, a dtype, a
tensor dropped or added). Each frame goes through `Transport.on_frame` as it would from the wire, and the
frames taken go through the receiver's rounds (`send`, then `receive` for each phase, as the driver calls
them). The DIMAT family merges with a real model (its alignment runs the received parameters), the
others run the exactness tests' least squares. test_message_layouts.py names the cases found by hand;
this searches for the ones not named. It found the DIMAT merge that raised on a model of another float
dtype (named below); one that raised on parameters large enough to overflow the activations came from
`simulate --attack 1:scale:1e6` (test_alignment.py names it)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_message_layouts import RUN, transport_for
from test_message_layouts import node as least_squares_node

from p2pnode.node.algorithms import ALGORITHMS
from p2pnode.node.algorithms.base import StepRule, as_tensor
from p2pnode.node.errors import Diverged
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.topology import complete
from p2pnode.node.training import VisionObjective
from p2pnode.protocol.codecs import CodecError, Encoded, get_codec
from p2pnode.protocol.envelope import KINDS, Envelope, ProtocolError, pack
from p2pnode.protocol.message import Message

COMMUNICATING = sorted(name for name, cls in ALGORITHMS.items() if cls.communicates)
MERGING = sorted(name for name in COMMUNICATING if getattr(ALGORITHMS[name], "matching", None) is not None)
PHASES = sorted({p for cls in ALGORITHMS.values() for p in cls.phases} | {"bogus"})
NAMES = sorted({n for cls in ALGORITHMS.values() for kinds in cls.messages.values() for layouts in kinds.values()
                for layout in layouts for n in layout} | {"zz"})  # fmt: skip
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]  # what codecs encode (validate refuses others)
CODECS = ["none", "fp16", "int8", "int4:8", "topk:0.5"]
VALUES = st.sampled_from([0.0, 1.0, -3.5, 1e30, 1e300, float("inf"), float("nan")])
_simulation: list[Simulation] = []


def vision_node(name: str, i: int, codec: str) -> object:
    """A node of `name` on digits with the smallest model, its neighbourhood in a complete graph of 3."""
    if not _simulation:
        split = "0-3,4-6,7-9"
        settings = SimulateSettings(nodes=3, split=split, epochs=1, batch_size=16, device="cpu", model="vit_digits_4px")
        _simulation.append(Simulation(settings))
    sim = _simulation[0]
    objective = VisionObjective(sim.model, sim.train_bank, sim.parts[i], 16, seed=i)
    algo = ALGORITHMS[name](
        complete(3).neighbourhood(i), objective, sim.initial.clone(), StepRule(lambda k: 1e-3), get_codec(codec)
    )
    algo.configure(iterations_per_epoch=1)  # a merge every round
    return algo


def receiver_and_sender(name: str) -> tuple[object, object]:
    build = vision_node if name in MERGING else least_squares_node
    return build(name, 0, "int8"), build(name, 1, "int8")


def raw(t: torch.Tensor) -> Encoded:
    """`t` as a hostile sender writes it, NaN and inf included (codecs refuse to encode those)."""
    t = t.to(torch.float64)
    return replace(get_codec("none").encode(torch.zeros_like(t)), payload=t.numpy().astype("<f8").tobytes())


def encode(t: torch.Tensor, codec: str) -> Encoded:
    try:
        return get_codec(codec).encode(t)
    except CodecError:  # NaN or inf, or a value past the dtype's range: a hostile sender writes what it wants
        return raw(t)


@st.composite
def tensors(draw, dim: int) -> dict:
    shapes = [(), (0,), (1,), (2,), (dim - 1,), (dim,), (dim + 1,), (1, dim), (dim, 1)]
    out = {}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True)):
        t = torch.full(draw(st.sampled_from(shapes)), draw(VALUES), dtype=torch.float64)
        t = t.to(draw(st.sampled_from(DTYPES)))
        out[name] = encode(t, draw(st.sampled_from(CODECS)) if t.dim() == 1 and t.numel() else "none")
    return out


@st.composite
def frames(draw, dim: int) -> Envelope:
    phase, kind = draw(st.sampled_from(PHASES)), draw(st.sampled_from(sorted(KINDS)))
    seq = draw(st.integers(0, 2**40))
    return Envelope(RUN, 0, draw(st.integers(0, 3)), phase, seq, "p1", kind, draw(tensors(dim)))


def real_messages(sender) -> list[Message]:
    """What an honest in-neighbour sends node 0 in two rounds (keyframes and increments, values, sums)."""
    out = []
    for k in range(2):
        for phase in sender.phases:
            out += [m for m in sender.send(phase, k) if m.dst == 0]
            sender.receive(phase, k, [])
    return out


def mutated(data: st.DataObject, m: Message) -> Envelope:
    """`m` with one field changed: its values, sequence number, round, a tensor's codec or dtype, a
    tensor dropped or one added."""
    tensors = {n: as_tensor(t).clone() for n, t in m.tensors.items()}
    seq, round_, codec = m.seq, m.round, "none"
    change = data.draw(st.sampled_from(["values", "seq", "round", "codec", "dtype", "drop", "add", "none"]))
    name = data.draw(st.sampled_from(sorted(tensors)))
    if change == "values":
        t = tensors[name].to(torch.float64)
        t[data.draw(st.integers(0, t.numel() - 1)) if data.draw(st.booleans()) else slice(None)] = data.draw(VALUES)
        tensors[name] = t
    elif change == "seq":
        seq = data.draw(st.sampled_from([0, seq - 1, seq + 1, seq + 2, 2**40]))
    elif change == "round":
        round_ = data.draw(st.integers(0, 3))
    elif change == "codec":
        codec = data.draw(st.sampled_from(CODECS))
    elif change == "dtype":
        tensors[name] = tensors[name].to(data.draw(st.sampled_from(DTYPES)))
    elif change == "drop":
        del tensors[name]
    elif change == "add":
        tensors[data.draw(st.sampled_from(NAMES))] = torch.zeros(tensors[name].numel())
    encoded = {n: encode(t, codec) for n, t in tensors.items()}
    return Envelope(RUN, 0, round_, m.phase, max(seq, 0), "p1", m.kind, encoded)


def run_rounds(algo, taken: dict[str, list[Message]], rounds: int) -> None:
    """The driver's calls; `Diverged` (the daemon's one-line stop, its last good checkpoint kept) is how
    a node without `--robust clip` ends when a neighbour's values poison it (DESIGN §9), never a crash."""
    for k in range(rounds):
        for phase in algo.phases:
            try:
                algo.send(phase, k)
            except Diverged:
                return
            algo.receive(phase, k, [m for m in taken.get(phase, []) if m.round <= k])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", COMMUNICATING)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_no_frame_an_admitted_member_can_build_makes_the_receiver_raise(name, data):
    algo, sender = receiver_and_sender(name)
    real, dim = real_messages(sender), algo.params.numel()
    transport, inbox, _ = transport_for(algo)
    for _ in range(data.draw(st.integers(1, 3))):
        hostile = data.draw(st.booleans())
        env = data.draw(frames(dim)) if hostile else mutated(data, data.draw(st.sampled_from(real)))
        try:
            frame = pack(env)
        except ProtocolError:  # the sender's own checks refused it: a hostile one would send it anyway
            continue
        assert asyncio.run(transport.on_frame(frame, "p1")) in (True, False)
    for messages in inbox.by_phase.values():
        for m in messages:
            assert algo.message_problem(m) is None, (m.phase, m.kind, {n: t.shape for n, t in m.tensors.items()})
    run_rounds(algo, inbox.by_phase, 2 if name in MERGING else 4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", MERGING)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_merging_node_takes_a_neighbour_model_sent_in_another_float_dtype(name, dtype):
    """Found by the search above: a model in another float dtype passed every check (the right size) and
    made the alignment's forward pass raise ('mixed dtype') inside the merge."""
    algo, sender = receiver_and_sender(name)
    model = next(m for m in real_messages(sender) if m.kind == "params")
    model.tensors["x"] = as_tensor(model.tensors["x"]).to(dtype)
    assert algo.message_problem(model) is None
    algo.send("merge", 0)
    algo.receive("merge", 0, [model])
    assert algo.merges == 1 and algo.params.dtype == torch.float32
