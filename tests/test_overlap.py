"""`--overlap`: P2P-FT computes its gradient at the value it sends (theta - lr tau) while the pull
exchange runs, instead of after mixing. The daemon (a background thread started before the values
travel) and the simulator (the same gradient, computed in turn) must agree; exactness is in
tests/test_exactness.py::test_p2pft_with_overlap_still_reaches_the_global_solution."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from p2pnode.node.pace import BackgroundGradients
from p2pnode.node.settings import SimulateSettings, TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import node_command, run_testnet

FAST = {"epochs": 1, "batch_size": 72}  # 4 nodes: 5 rounds per epoch


class Gated:
    """A gradient that takes until the test opens the gate, and says where it was taken."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.began = threading.Event()

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        self.began.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return params.clone(), 0.0


def test_a_started_gradient_computes_in_the_background_and_is_the_one_the_round_gets():
    objective = Gated()
    background = BackgroundGradients(objective)
    try:
        background.start(torch.tensor([1.0]))  # returns at once: the computation waits for the gate
        assert objective.began.wait(5), "start() did not begin the gradient"
        assert background.running is not None and not background.running.done()
        objective.gate.set()
        assert background.gradient(torch.tensor([2.0]))[0].tolist() == [1.0]  # the started one
        assert background.gradient(torch.tensor([3.0]))[0].tolist() == [3.0]  # nothing started: computes now
    finally:
        objective.gate.set()
        background.shutdown()


def test_overlap_changes_where_the_simulated_gradient_is_taken():
    plain = Simulation(SimulateSettings(nodes=4, **FAST))
    plain.run("p2pft")
    overlapped = Simulation(SimulateSettings(nodes=4, overlap=True, **FAST))
    overlapped.run("p2pft")
    assert all(n.overlap for n in overlapped.nodes) and not any(n.overlap for n in plain.nodes)
    pairs = zip(plain.nodes, overlapped.nodes, strict=True)
    assert max(float((a.params - b.params).abs().max()) for a, b in pairs) > 1e-4


def test_the_testnet_passes_overlap_to_every_node(tmp_path):
    settings = TestnetSettings(overlap=True).validate()
    commands = [node_command(settings, i, ["/ip4/127.0.0.1/tcp/1/p2p/x"], tmp_path / str(i)) for i in range(4)]
    assert all("--overlap" in c for c in commands)


@pytest.mark.timeout(300)
def test_overlapped_daemons_match_the_overlapped_simulator_after_five_rounds(tmp_path, own_processes):
    exact = {"overlap": True, "codec": "none", **FAST}  # as in test_daemon.py: float noise, not int8 steps
    settings = TestnetSettings(nodes=4, workdir=str(tmp_path), run_id="overlap", timeout=240, **exact)
    result = run_testnet(settings.validate())
    assert result.results["p2pft"].iterations == 5
    # uncompressed: int8 would turn float noise between the processes into whole rounding steps
    overlapped = Simulation(SimulateSettings(nodes=4, overlap=True, codec="none", **FAST))
    overlapped.run("p2pft")
    plain = Simulation(SimulateSettings(nodes=4, codec="none", **FAST))
    plain.run("p2pft")
    for i in range(4):
        state = load_file(str(tmp_path / f"node{i}" / "state.safetensors"))
        assert (state["params"] - overlapped.nodes[i].params).abs().max() <= 1e-5
        assert (state["tau"] - overlapped.nodes[i].tau).abs().max() <= 1e-5
        # the check can fail: the plain run takes its gradients elsewhere
        assert (state["params"] - plain.nodes[i].params).abs().max() > 1e-4
    assert not own_processes(), "a daemon or node process outlived the testnet"
