"""`--local-steps K` (K-GT): K tracker-corrected gradient steps per P2P-FT exchange, so a pass over the
data takes K times fewer rounds and bytes. Exactness is in tests/test_exactness.py; here the flags, the
run's schedule, and the daemons against the simulator."""

from __future__ import annotations

import pytest

from p2pnode.cli.app import main
from p2pnode.node.settings import SimulateSettings, TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import run_testnet


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["simulate", "--local-steps", "0"], "--local-steps must be at least 1"),
        (["simulate", "--local-steps", "2", "--algorithm", "dsgd"], "--local-steps is for p2pft"),
        (["simulate", "--local-steps", "2", "--sync", "async"], "--local-steps needs --sync wait"),
        (["testnet", "--local-steps", "2", "--algorithm", "dimat"], "--local-steps is for p2pft"),
        # 1,437 digits over 4 nodes in batches of 16: 23 mini-batches a pass (24 trained 24/23 passes a round)
        (["simulate", "--local-steps", "24", "--epochs", "1"], "--local-steps 24 is more than a pass over the data"),
    ],
)
def test_bad_local_steps_flags_exit_2_with_one_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


@pytest.mark.timeout(300)
def test_local_steps_cut_p2pfts_rounds_and_bytes_per_pass_but_not_the_references():
    quick = dict(epochs=2, compare=["central"], model="vit_digits_4px", lr=0.005)  # the default needs more epochs
    one = Simulation(SimulateSettings(**quick).validate())
    two = Simulation(SimulateSettings(**quick, local_steps=2).validate())
    p2p_one, p2p_two = one.run("p2pft"), two.run("p2pft")
    assert p2p_two.iterations == pytest.approx(p2p_one.iterations / 2, abs=1)
    for a, b in zip(p2p_one.bytes_sent, p2p_two.bytes_sent, strict=True):
        assert b == pytest.approx(a / 2, rel=0.05)
    assert one.run("central").iterations == two.run("central").iterations
    assert max(p2p_two.accuracy) - min(p2p_two.accuracy) <= 0.02  # still in consensus


@pytest.mark.timeout(300)
def test_daemons_with_local_steps_run_the_simulators_schedule_and_end_where_it_does(tmp_path):
    # uncompressed, so that the daemons compute what the simulator does (int8's rounding can differ by a step)
    common = dict(nodes=3, split="0-2,3-5,6-9", epochs=2, batch_size=32, local_steps=3, codec="none")
    result = run_testnet(TestnetSettings(workdir=str(tmp_path), run_id="local", timeout=240, **common).validate())
    daemons = result.results["p2pft"]
    reference = Simulation(SimulateSettings(**common).validate()).run("p2pft")
    assert daemons.iterations == reference.iterations
    for got, want in zip(daemons.accuracy, reference.accuracy, strict=True):
        assert abs(got - want) <= 0.01
