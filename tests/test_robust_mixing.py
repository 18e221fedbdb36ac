"""`--robust clip` and `simulate --attack`: a Byzantine neighbour cannot drag honest nodes away."""

from __future__ import annotations

import pytest
import torch

from p2pnode.cli.app import main
from p2pnode.node.algorithms.robust import clip, clip_around, radius
from p2pnode.node.attacks import parse_attacks
from p2pnode.node.errors import BadInput
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation

SMALL = dict(nodes=5, split="iid", topology="exponential", epochs=4, batch_size=64, lr=0.02)


def honest_mean(robust: str, attack: list[str]) -> float:
    result = Simulation(SimulateSettings(robust=robust, attack=attack, **SMALL).validate()).run("p2pft")
    assert result.attackers == sorted(int(a.split(":")[0]) for a in attack)
    return result.honest_mean


@pytest.mark.parametrize(
    "spec, reason",
    [("9:signflip", "node"), ("1:bogus", "bogus"), ("1:scale:abc", "scale"), ("x", "NODE:KIND")],
)
def test_bad_attack_specs_are_refused_with_one_line(spec, reason):
    with pytest.raises(BadInput, match=reason):
        parse_attacks([spec], 4)


def test_the_cli_refuses_an_attacker_outside_the_run(capsys):
    assert main(["simulate", "--nodes", "4", "--split", "iid", "--attack", "9:signflip"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_clipping_bounds_a_huge_neighbour_and_leaves_the_close_ones_alone():
    centre = torch.zeros(100, dtype=torch.float64)
    honest = {0: torch.full((100,), 0.1, dtype=torch.float64), 1: torch.full((100,), -0.2, dtype=torch.float64)}
    values = {**honest, 2: torch.full((100,), 1e6, dtype=torch.float64)}
    out = clip_around(centre, values)
    c = radius([float(torch.linalg.vector_norm(v)) for v in values.values()])
    assert float(torch.linalg.vector_norm(out[2])) <= c + 1e-9
    for j, v in honest.items():
        assert torch.equal(out[j], v)  # the honest ones are within the radius: untouched
    assert torch.equal(clip(torch.full((3,), float("nan")), 1.0), torch.zeros(3))
    assert radius([5.0]) == float("inf")  # one in-neighbour: nothing to compare it with, nothing clipped


@pytest.mark.timeout(300)
def test_a_sign_flipping_or_scaling_neighbour_breaks_plain_mixing_but_not_clipped_mixing():
    benign_none, benign_clip = honest_mean("none", []), honest_mean("clip", [])
    assert abs(benign_clip - benign_none) <= 0.01  # the rule costs (almost) nothing without an attacker
    for attack in ("4:signflip", "4:scale:100"):
        plain, clipped = honest_mean("none", [attack]), honest_mean("clip", [attack])
        assert plain < 0.2, (attack, plain)  # the honest nodes collapse to chance
        assert clipped > plain + 0.3 and clipped > benign_none - 0.1, (attack, clipped, benign_none)


@pytest.mark.timeout(300)
def test_without_robust_mixing_or_an_attacker_a_run_is_what_it_always_was():
    # same settings, --robust none and no --attack, two ways: the default settings object and explicit
    # flags; and the least-squares exactness tests (tests/test_exactness.py) run with the default rule
    a = Simulation(SimulateSettings(**SMALL).validate()).run("p2pft")
    b = Simulation(SimulateSettings(robust="none", attack=[], **SMALL).validate()).run("p2pft")
    assert a.accuracy == b.accuracy and a.history["loss"] == b.history["loss"]
    assert a.attackers == [] and a.honest_mean == pytest.approx(sum(a.accuracy) / len(a.accuracy))
