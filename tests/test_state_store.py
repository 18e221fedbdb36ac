"""A daemon's checkpoint: the tensors and the round they belong to are written as one, and a
checkpoint of another run is set aside, never resumed and never overwritten."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from p2pnode.node.errors import BadInput
from p2pnode.node.state_store import StateDirLock, StateStore, make_state_dir

RUN = {"run_id": "r", "fingerprint": "trunk", "settings_hash": "s1"}


def algorithm(value: float) -> SimpleNamespace:
    """What StateStore.save reads of an algorithm: its state and an objective (here without a batch order)."""
    params = torch.full((4,), value)
    return SimpleNamespace(model_state_dict=lambda: {"params": params}, objective=object())


def test_a_checkpoint_holds_what_a_restart_takes_and_no_link_state(tmp_path):
    """Parameters and momentum, nothing of the links a restart never resumes: on a complete graph of 8
    the running sums, replicas and trackers made a checkpoint 56 times the parameters' size (14 on a ring)."""
    from test_exactness import problem

    from p2pnode.node.algorithms import ALGORITHMS, StepRule
    from p2pnode.node.engine import InMemoryNetwork
    from p2pnode.node.topology import complete

    objectives, _ = problem(n=8, dim=64, rows=80)
    topo = complete(8)
    x0 = torch.zeros(64, dtype=torch.float64)
    nodes = [
        ALGORITHMS["p2pft"](topo.neighbourhood(i), o, x0, StepRule(lambda k: 1e-3, 0.9))
        for i, o in enumerate(objectives)
    ]
    net = InMemoryNetwork(nodes)
    for k in range(3):
        net.iteration(k)
    StateStore(tmp_path, RUN).save(nodes[0], {"round": 3})
    size = (tmp_path / "state.safetensors").stat().st_size
    assert size < 3 * nodes[0].params.numel() * 8 + 4096  # params and momentum, float64, and the header
    restarted = ALGORITHMS["p2pft"](topo.neighbourhood(0), objectives[0], x0, StepRule(lambda k: 1e-3, 0.9))
    restarted.load_model_state(StateStore(tmp_path, RUN).load().state)
    assert torch.equal(restarted.params, nodes[0].params)
    assert torch.equal(restarted.step.state_dict()["momentum_buffer"], nodes[0].step.state_dict()["momentum_buffer"])


def test_a_checkpoint_resumes_with_the_round_it_was_saved_at(tmp_path):
    StateStore(tmp_path, RUN).save(algorithm(1.0), {"round": 50})
    checkpoint = StateStore(tmp_path, RUN).load()
    assert checkpoint.round == 50 and torch.equal(checkpoint.state["params"], torch.full((4,), 1.0))


def test_a_crash_between_the_tensors_and_their_json_copy_still_pairs_tensors_with_their_round(tmp_path, monkeypatch):
    store = StateStore(tmp_path, RUN)
    store.save(algorithm(1.0), {"round": 50})

    def crash(name, payload):
        raise KeyboardInterrupt  # the process dies after the tensors' rename, before state.json

    monkeypatch.setattr(store, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(algorithm(2.0), {"round": 100})
    assert json.loads((tmp_path / "state.json").read_text())["round"] == 50  # the stale copy
    checkpoint = StateStore(tmp_path, RUN).load()
    assert checkpoint.round == 100 and torch.equal(checkpoint.state["params"], torch.full((4,), 2.0))


def test_another_runs_checkpoint_is_set_aside_with_its_result_and_never_overwritten(tmp_path):
    first = StateStore(tmp_path, RUN)
    first.save(algorithm(1.0), {"round": 900})
    first.write_json("result.json", {"accuracy": 0.96})
    first.close()
    other = StateStore(tmp_path, {**RUN, "settings_hash": "s2"})
    assert other.load() is None and other.saved_round() == 0
    other.save(algorithm(7.0), {"round": 50})
    kept = other.set_aside
    assert kept is not None and kept.parent == tmp_path
    assert json.loads((kept / "result.json").read_text()) == {"accuracy": 0.96}
    assert not (tmp_path / "result.json").exists()
    old = StateStore(kept, RUN).load()  # the first run can still resume from where it was kept
    assert old.round == 900 and torch.equal(old.state["params"], torch.full((4,), 1.0))


def test_an_unreadable_checkpoint_is_set_aside_and_the_node_starts_afresh(tmp_path):
    (tmp_path / "state.safetensors").write_bytes(b"\x00torn")
    (tmp_path / "state.json").write_text(json.dumps({**RUN, "round": 10}))
    store = StateStore(tmp_path, RUN)
    assert store.load() is None and store.saved_round() == 0
    assert (store.set_aside / "state.safetensors").read_bytes() == b"\x00torn"


def test_the_same_runs_checkpoint_is_not_moved(tmp_path):
    StateStore(tmp_path, RUN).save(algorithm(1.0), {"round": 50})
    store = StateStore(tmp_path, RUN)
    assert store.set_aside is None and store.saved_round() == 50


def test_a_state_dir_that_is_a_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes"
    path.write_text("x")
    with pytest.raises(BadInput, match="is a file: give a directory"):
        make_state_dir(path)


@contextlib.contextmanager
def tiny_disk(tmp_path, size: str = "256k"):
    """A tmpfs of `size` at tmp_path/disk (root only), unmounted however the test ends."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk) -> None:
    with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"\0" * 4096):
            pass


def test_a_full_disk_keeps_the_last_checkpoint_and_training_goes_on_until_there_is_room(tmp_path, caplog):
    with tiny_disk(tmp_path) as disk:
        store = StateStore(disk, RUN)
        assert store.save(algorithm(1.0), {"round": 50})
        fill(disk)
        assert not store.save(algorithm(2.0), {"round": 100})  # returns, never raises
        assert not store.write_json("progress.json", {"epoch": 3})
        assert not list(disk.glob("*.tmp"))  # no partial file left to hold the space
        assert "could not write the checkpoint of round 100" in caplog.text
        checkpoint = StateStore(disk, RUN).load()
        assert checkpoint.round == 50 and torch.equal(checkpoint.state["params"], torch.full((4,), 1.0))
        (disk / "filler").unlink()
        assert store.save(algorithm(3.0), {"round": 150})
        assert StateStore(disk, RUN).load().round == 150


def test_a_result_the_disk_refuses_is_written_to_the_log_instead(tmp_path, caplog, monkeypatch):
    from p2pnode.node.run_log import RunLog

    store = StateStore(tmp_path, RUN)
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    result = RunLog(store).write_result({"rounds": 920})
    assert result["rounds"] == 920 and not (tmp_path / "result.json").exists()
    assert '"rounds": 920' in caplog.text and "result.json not written" in caplog.text


def test_a_checkpoint_written_before_the_header_resumes_from_its_json_copy(tmp_path):
    from safetensors.torch import save_file

    save_file({"params": torch.full((4,), 5.0)}, str(tmp_path / "state.safetensors"))  # no metadata
    (tmp_path / "state.json").write_text(json.dumps({**RUN, "round": 300}))
    checkpoint = StateStore(tmp_path, RUN).load()
    assert checkpoint.round == 300 and torch.equal(checkpoint.state["params"], torch.full((4,), 5.0))


def test_a_second_daemon_on_a_state_dir_in_use_is_refused_in_one_line_and_gets_it_once_freed(tmp_path, capsys):
    from p2pnode.cli.app import main

    held = StateDirLock.acquire(tmp_path)
    with pytest.raises(BadInput, match=f"in use by another p2pnode \\(pid {os.getpid()}\\)"):
        StateDirLock.acquire(tmp_path)
    assert main(["start", "--index", "0", "--state-dir", str(tmp_path)]) == 2
    assert "give each node its own state directory" in capsys.readouterr().err
    held.release()
    StateDirLock.acquire(tmp_path).release()


def test_a_killed_daemon_leaves_its_state_dir_free(tmp_path):
    script = (
        "import time; from p2pnode.node.state_store import StateDirLock; "
        f"held = StateDirLock.acquire({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BadInput, match=f"pid {holder.pid}"):
            StateDirLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    StateDirLock.acquire(tmp_path).release()
