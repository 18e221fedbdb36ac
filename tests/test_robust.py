"""`--robust clip` (self-centred clipping, node/algorithms/robust.py) and `simulate --attack` (node/attacks.py)."""

from __future__ import annotations

import math

import pytest
import torch
from test_exactness import problem

from p2pnode.cli.app import main
from p2pnode.node.algorithms import ALGORITHMS, StepRule, robust
from p2pnode.node.algorithms import p2pft as p2pft_module
from p2pnode.node.algorithms.pull import PullChannel
from p2pnode.node.attacks import KINDS, Attack, Poisoner, alie_z, parse_attacks
from p2pnode.node.churn import parse_churn
from p2pnode.node.engine import InMemoryNetwork
from p2pnode.node.errors import BadInput
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation, iterations_per_epoch
from p2pnode.node.topology import exponential
from p2pnode.protocol.codecs import Encoded, get_codec
from p2pnode.protocol.message import Message

# --- parsing ---------------------------------------------------------------------------------------

BAD_ATTACKS = {
    "unknown-kind": ("1:bitflip", "unknown --attack kind 'bitflip'"),
    "node-out-of-range": ("9:signflip", "names node 9, but the run has nodes 0..3"),
    "factor-not-a-number": ("1:scale:abc", "bad --attack factor"),
    "factor-missing": ("1:scale", "bad --attack factor"),
    "factor-infinite": ("1:scale:inf", "bad --attack factor"),
    "factor-overflowing": ("1:scale:1e40", "bad --attack factor"),
    "argument-to-signflip": ("1:signflip:2", "signflip takes no argument"),
    "no-kind": ("1", "write NODE:KIND"),
    "negative-node": ("-1:noise", "write NODE:KIND"),
    "same-node-twice": ("1:noise,1:stale", "names node 1 twice"),
    "everyone-byzantine": ("0:noise,1:noise,2:noise,3:noise", "leave at least one honest node"),
}


@pytest.mark.parametrize("case", list(BAD_ATTACKS))
def test_bad_attack_is_refused_with_a_message_naming_the_problem(case):
    spec, message = BAD_ATTACKS[case]
    with pytest.raises(BadInput, match=message):
        parse_attacks([spec], 4)


def test_attacks_parse_from_repeated_and_comma_separated_flags():
    attacks = parse_attacks(["0:signflip,2:scale:100", "3:alie"], 4)
    assert attacks == [Attack(0, "signflip"), Attack(2, "scale", 100.0), Attack(3, "alie")]
    assert [str(a) for a in attacks] == ["0:signflip", "2:scale:100", "3:alie"]
    assert parse_attacks([], 4) == [] and parse_attacks(None, 4) == []


def test_settings_refuse_a_bad_attack_before_anything_runs():
    with pytest.raises(BadInput, match="unknown --attack kind"):
        SimulateSettings(nodes=4, split="iid", attack=["1:nope"]).validate()


def test_cli_attack_on_a_node_outside_the_run_exits_2_with_one_error_line(capsys):
    code = main(["simulate", "--epochs", "1", "--nodes", "4", "--split", "iid", "--attack", "9:signflip"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "node 9" in lines[0]
    assert "Traceback" not in out + err


def test_alie_shift_is_baruchs_z_max():
    assert alie_z(5, 1) == pytest.approx(0.2533, abs=1e-4)  # s = 2 supporters needed of 5
    assert alie_z(50, 12) > alie_z(5, 1)  # larger runs allow a larger hidden shift


# --- clipping --------------------------------------------------------------------------------------


def test_clipping_bounds_a_huge_neighbour_and_leaves_the_honest_ones_untouched():
    own = torch.zeros(50, dtype=torch.float64)
    honest = {1: torch.full((50,), 0.1, dtype=torch.float64), 2: torch.full((50,), -0.3, dtype=torch.float64)}
    out = robust.clip_around(own, {**honest, 3: torch.full((50,), 1e12, dtype=torch.float64)})
    c = float(torch.linalg.vector_norm(honest[2]))  # (d - b)-th smallest distance: the larger honest one
    assert float(torch.linalg.vector_norm(out[3])) == pytest.approx(c)
    assert all(torch.equal(out[j], v) for j, v in honest.items())
    nan = robust.clip_around(own, {**honest, 3: torch.full((50,), math.nan, dtype=torch.float64)})
    assert torch.equal(nan[3], own)  # nothing usable came: it counts as this node's own value


def test_clipped_pull_mix_moves_a_node_at_most_its_neighbour_weight_times_the_radius():
    hood = exponential(5).neighbourhood(0)  # in-neighbours 1, 3, 4
    own = torch.zeros(20)
    channel = PullChannel(hood, own)
    sent = {1: torch.full((20,), 0.01), 3: torch.full((20,), -0.02), 4: torch.full((20,), 1e6)}
    channel.receive([Message(j, 0, 0, "mix", "value", {"v": v}) for j, v in sent.items()])
    plain, clipped = channel.mix(own, 0), channel.mix(own, 0, clipping=True)
    radius = float(torch.linalg.vector_norm(sent[3]))
    assert float(torch.linalg.vector_norm(plain)) > 1e6  # one huge value drags the plain mix away
    assert float(torch.linalg.vector_norm(clipped)) <= 3 * hood.row_weight(4) * radius + 1e-6


def test_radius_with_too_few_in_neighbours_clips_nothing():
    assert robust.radius([3.0]) == math.inf
    assert robust.radius([1.0, 5.0]) == 1.0
    assert robust.radius([1.0, 5.0, 2.0]) == 2.0


# --- attacks on the wire ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("kind", [k if k != "scale" else "scale:100" for k in KINDS])
def test_poisoned_messages_are_finite_well_formed_and_differ_from_the_honest_ones(kind, codec):
    objectives, _ = problem(n=5)
    topo = exponential(5)
    x0 = torch.ones(objectives[0].dim, dtype=torch.float64)
    enc = None if codec == "none" else get_codec(codec)
    nodes = [
        ALGORITHMS["p2pft"](topo.neighbourhood(i), o, x0, StepRule(lambda k: 1e-3), enc)
        for i, o in enumerate(objectives)
    ]
    net = InMemoryNetwork(nodes)
    net.deliver = Poisoner(parse_attacks([f"4:{kind}"], 5), net, codec, 0)
    seen: list[tuple[Message, dict]] = []
    deliver = net.deliver

    def spy(m: Message) -> bool:
        before = dict(m.tensors)
        ok = deliver(m)
        seen.append((m, before))
        return ok

    net.deliver = spy
    for k in range(3):
        net.iteration(k)
    bad = [(m, before) for m, before in seen if m.src == 4]
    assert bad
    changed = 0
    for m, before in bad:
        for name, t in m.tensors.items():
            assert isinstance(t, Encoded) == isinstance(before[name], Encoded)
            value = t if isinstance(t, torch.Tensor) else get_codec(codec).decode(t)
            honest = before[name] if isinstance(before[name], torch.Tensor) else get_codec(codec).decode(before[name])
            assert value.shape == honest.shape and value.dtype == honest.dtype
            assert torch.isfinite(value).all()
            changed += not torch.equal(value, honest)
    assert changed > 0  # every kind changes something within three rounds (stale: from round 1 on)


def least_squares_nodes(name: str) -> list:
    """Five nodes of `name` on the exactness test's least-squares problem, exponential graph."""
    objectives, _ = problem(n=5)
    topo = exponential(5)
    x0 = torch.zeros(objectives[0].dim, dtype=torch.float64)
    return [ALGORITHMS[name](topo.neighbourhood(i), o, x0, StepRule(lambda k: 1e-3)) for i, o in enumerate(objectives)]


# --- trackers --------------------------------------------------------------------------------------


def tracking_gaps(
    nodes: list, rounds: int, deliver=None, kick_at: int | None = None, honest: int = 4
) -> list[torch.Tensor]:
    """sum tau - sum g over the first `honest` nodes after each round; `kick_at`: add stray mass
    (norm 100) to node 0's tau then."""
    net = InMemoryNetwork(nodes, deliver)
    gaps = []
    for k in range(rounds):
        net.iteration(k)
        if k == kick_at:
            nodes[0].tau = nodes[0].tau + 100 * torch.ones_like(nodes[0].tau) / nodes[0].tau.numel() ** 0.5
        gaps.append(sum(n.tau for n in nodes[:honest]) - sum(n.grad for n in nodes[:honest]))
    return gaps


def clipping_nodes(name: str) -> list:
    nodes = least_squares_nodes(name)
    for n in nodes:
        n.robust = "clip"
    return nodes


@pytest.mark.parametrize("leak, fades", [(robust.TRACKER_LEAK, True), (0.0, False)])
def test_leaky_tracker_forgets_stray_mass_instead_of_keeping_it(leak, fades, monkeypatch):
    monkeypatch.setattr(p2pft_module, "TRACKER_LEAK", leak)
    quiet = tracking_gaps(clipping_nodes("p2pft"), 200, honest=5)
    kicked = tracking_gaps(clipping_nodes("p2pft"), 200, kick_at=100, honest=5)
    stray = [float((a - b).norm()) for a, b in zip(kicked, quiet, strict=True)]
    assert stray[99] == 0 and stray[100] > 50, stray[99:101]  # the stray mass is in
    if fades:
        assert stray[-1] < 0.02 * stray[100], stray[::20]  # what is left: the runs parted a little
    else:  # an exact tracker conserves whatever got in: clipped or lost mass would stay for good
        assert stray[-1] > 0.5 * stray[100], stray[::20]


def test_clipped_tracker_bounds_a_scaling_neighbours_mass_where_plain_tracking_explodes():
    def attacked(nodes: list) -> list[float]:
        net = InMemoryNetwork(nodes)
        poisoner = Poisoner([Attack(4, "scale", 100.0)], net, "none", 0)
        return tracking_gaps(nodes, 300, deliver=poisoner)

    plain = [float(g.norm()) for g in attacked(least_squares_nodes("p2pft"))]
    clipped = [float(g.norm()) for g in attacked(clipping_nodes("p2pft"))]
    assert plain[-1] > 1e6 * plain[0]
    assert max(clipped[150:]) <= 1.5 * max(clipped[:150])  # bounded: nothing piles up


def test_robust_none_never_enters_the_robust_code(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("--robust none must not clip")

    monkeypatch.setattr(robust, "clip", forbidden)
    monkeypatch.setattr(robust.MassClipper, "apply", forbidden)
    objectives, _ = problem(n=5)
    topo = exponential(5)
    x0 = torch.zeros(objectives[0].dim, dtype=torch.float64)
    for name in ("p2pft", "dsgd", "sgp"):
        nodes = [
            ALGORITHMS[name](topo.neighbourhood(i), o, x0, StepRule(lambda k: 1e-3)) for i, o in enumerate(objectives)
        ]
        net = InMemoryNetwork(nodes)
        for k in range(5):
            net.iteration(k)


# --- small digits runs -----------------------------------------------------------------------------

# vit_digits_4px: 4 epochs are too few for the default vit_digits to pass 50% at this step
SMALL = dict(
    nodes=5, split="iid", topology="exponential", epochs=4, batch_size=64, lr=0.05, device="cpu", model="vit_digits_4px"
)
ATTACKER = 4


@pytest.fixture(scope="module")
def sim():
    return Simulation(SimulateSettings(**SMALL).validate())


def honest_accuracy(sim: Simulation, algorithm: str, robust_rule: str, attack: str | None = None) -> float:
    sim.settings.robust = robust_rule
    sim.attacks = parse_attacks([f"{ATTACKER}:{attack}"] if attack else [], SMALL["nodes"])
    sim.churn = []
    hooks = []
    result = sim.run(algorithm, on_round=lambda k, net: hooks.append(net.deliver))
    assert result.attackers == ([ATTACKER] if attack else [])
    assert all(isinstance(h, Poisoner) for h in hooks) if attack else hooks[0] is None  # no attack: no hook
    return result.honest_mean


def honest_only_accuracy(sim: Simulation, algorithm: str) -> float:
    """The 4 honest nodes alone, on the same shares and rounds: node 4 joins only at the last round."""
    sim.settings.robust, sim.attacks = "none", []
    last = iterations_per_epoch(sum(len(p) for p in sim.parts), SMALL["nodes"], SMALL["batch_size"]) * SMALL["epochs"]
    sim.churn = parse_churn(f"join:{ATTACKER}@{last - 1}", SMALL["nodes"])
    accuracy = sim.run(algorithm).accuracy
    sim.churn = []
    return sum(accuracy[:ATTACKER]) / ATTACKER


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", ["p2pft", "dsgd"])
def test_clip_without_an_attacker_stays_near_the_plain_run(sim, algorithm):
    plain, clipped = honest_accuracy(sim, algorithm, "none"), honest_accuracy(sim, algorithm, "clip")
    assert abs(clipped - plain) <= 0.03, (plain, clipped)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("algorithm", ["p2pft", "dsgd"])
def test_signflip_or_scale_collapses_plain_mixing_but_clipped_honest_nodes_stay_near_the_honest_only_run(
    sim, algorithm
):
    reference = honest_only_accuracy(sim, algorithm)
    assert reference > 0.5
    for attack in ("signflip", "scale:100"):
        plain = honest_accuracy(sim, algorithm, "none", attack)
        clipped = honest_accuracy(sim, algorithm, "clip", attack)
        assert plain < 0.2, (attack, plain)  # chance is 0.1
        assert clipped >= reference - 0.05, (attack, clipped, reference)
