"""A node whose own values stop being finite (a step size far too large, or a hostile neighbour mixed
in without --robust clip) never sends them: `send` raises `Diverged`, with what to do, whatever the
codec; the simulator lets such a node fall silent and the run goes on; a daemon keeps its last
finite checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from p2pnode.cli.app import main
from p2pnode.node.algorithms import ALGORITHMS, StepRule
from p2pnode.node.engine import InMemoryNetwork
from p2pnode.node.errors import BadInput, Diverged
from p2pnode.node.topology import directed_ring
from p2pnode.protocol.codecs import get_codec


class Quadratic:
    def __init__(self, centre: float) -> None:
        self.centre, self.dim = centre, 3

    def gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return x - self.centre, float(0.5 * ((x - self.centre) ** 2).sum())


def nodes(name: str, codec: str, lr: float) -> list:
    topo = directed_ring(3)
    compress = None if codec == "none" else get_codec(codec)
    x0 = torch.zeros(3, dtype=torch.float64)
    step = StepRule(lambda k: lr)
    return [ALGORITHMS[name](topo.neighbourhood(i), Quadratic(i), x0, step, compress) for i in range(3)]


@pytest.mark.parametrize("codec", ["none", "int8", "fp16"])
@pytest.mark.parametrize("name", ["p2pft", "dsgd"])
def test_a_node_with_non_finite_values_refuses_to_send_them_and_says_what_to_do(name, codec):
    node = nodes(name, codec, 0.1)[0]
    node.params = torch.full_like(node.params, float("nan"))
    with pytest.raises(Diverged, match=r"node 0 diverged at round 7 .*lower --lr, or use --robust clip") as caught:
        node.send(node.phases[0], 7)
    assert isinstance(caught.value, BadInput)  # the CLI prints it as one line and exits 2
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_a_simulated_run_whose_nodes_diverge_goes_on_and_they_fall_silent(codec, caplog):
    group = nodes("p2pft", codec, 1e3)  # far too large a step for a unit quadratic: |x| grows 1000x a round
    net = InMemoryNetwork(group)
    with caplog.at_level(logging.WARNING, logger="p2pnode.node.engine"):
        for k in range(200):
            net.iteration(k)
    assert net.diverged == {0, 1, 2}
    assert "diverged at round" in caplog.text and "it sends nothing more" in caplog.text
    sent = list(net.messages_sent)
    net.iteration(200)
    assert net.messages_sent == sent  # silent from then on


def test_a_run_with_a_sane_step_never_diverges():
    net = InMemoryNetwork(nodes("p2pft", "int8", 0.1))
    for k in range(200):
        net.iteration(k)
    assert not net.diverged
    assert all(abs(float(n.params.mean()) - 1.0) < 1e-6 for n in net.nodes)  # the average centre


@pytest.mark.timeout(300)
def test_a_testnet_whose_daemons_diverge_stops_with_the_nodes_one_line_error(tmp_path, capsys, own_processes):
    argv = ["testnet", "--nodes", "4", "--epochs", "1", "--batch-size", "72", "--lr", "100000"]
    assert main([*argv, "--workdir", str(tmp_path), "--run-id", "diverge"]) == 2
    err = capsys.readouterr().err.strip()
    assert "diverged at round" in err and "lower --lr" in err and len(err.splitlines()) == 1, err
    for state in tmp_path.glob("node*/state.safetensors"):  # no checkpoint of non-finite values
        assert torch.isfinite(load_file(str(state))["params"]).all()
    assert not own_processes(), "a daemon outlived the failed testnet"
