"""`p2pnode simulate` through `main(argv)`: one-line errors with exit code 2, and a short real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from p2pnode.cli.app import main
from p2pnode.node.models import build_model
from p2pnode.protocol.codecs import DEFAULT_BLOCK

FAST = ["--epochs", "1"]


def disconnected_topology(tmp_path) -> str:
    path = tmp_path / "islands.txt"
    path.write_text("# two islands\n0 <-> 1\n2 <-> 3\n")
    return str(path)


def assert_one_error_line(code: int, out: str, err: str, message: str) -> None:
    """Exit code 2, one `error: ...` line on stderr that says `message`, no traceback anywhere."""
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err + out


ERROR_CASES = {
    "malformed-split": (["--split", "0-1,2-x,4-6,7-9"], "bad --split"),
    "classes-missing-from-data": (["--split", "0-1,2-3,4-6,7-12"], "class 10 is not in digits"),
    "reversed-class-range": (["--split", "0-1,3-2,4-6,7-9"], "bad --split '3-2'"),
    "disconnected-topology": (["--topology", "{islands}"], "not strongly connected"),
    "unknown-model": (["--model", "vit_smal_patch16_224"], "did you mean"),
    "missing-checkpoint": (["--checkpoint", "{tmp}/missing.safetensors"], "does not exist"),
    "zero-lr": (["--lr", "0"], "--lr must be a positive"),
    "negative-lr": (["--lr", "-1"], "--lr must be a positive"),
    "negative-lr-equals": (["--lr=-1"], "--lr must be a positive"),
    "unknown-option": (["--no-such-option"], "No such option"),
    "non-integer-epochs": (["--epochs", "two"], "--epochs"),
    "unknown-algorithm": (["--algorithm", "fedavg"], "unknown algorithm 'fedavg'"),
    "unknown-compare-algorithm": (["--compare", "local,fedavg"], "unknown algorithm 'fedavg'"),
    "split-longer-than-nodes": (["--nodes", "3"], "4 class sets but --nodes is 3"),
    "nan-weight-decay": (["--weight-decay", "nan"], "--weight-decay must be a finite number (got nan)"),
    "negative-seed": (["--seed", "-5"], "--seed must be a whole number >= 0 (got -5)"),
    "negative-model-seed": (["--model-seed", "-1"], "--model-seed must be a whole number >= 0"),
    "dimat-warmup-past-the-run": (  # ran as Local-FT under DIMAT's name
        ["--algorithm", "dimat", "--topology", "ring", "--warmup-epochs", "1"],
        "dimat would never merge: with --warmup-epochs 1 and --merge-every 1 its first merge ends epoch 2, past "
        "--epochs 1",
    ),
    "wa-compared-merge-period-past-the-run": (
        ["--compare", "wa", "--topology", "ring", "--merge-every", "2"],
        "wa would never merge",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_2_with_one_error_line_and_no_traceback(case, tmp_path, capsys):
    args, message = ERROR_CASES[case]
    args = [a.format(islands=disconnected_topology(tmp_path), tmp=tmp_path) for a in args]
    code = main(["simulate", *FAST, *args])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out


ADDRESS_CASES = {
    "start-peers-not-a-multiaddr": (["start", "--index", "0", "--peers", "203.0.113.5:31337"], "bad --peers"),
    "start-peers-without-peer-id": (["start", "--index", "0", "--peers", "/ip4/127.0.0.1/tcp/1"], "no /p2p/PEER_ID"),
    "start-peers-bad-peer-id": (["start", "--index", "0", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/QmBad"], "bad --peers"),
    "start-listen": (["start", "--index", "0", "--listen", "0.0.0.0:31337"], "bad --listen"),
    "start-announce": (["start", "--index", "0", "--announce", "/ip4/1.2.3.4/tcp/x"], "bad --announce"),
    "status-peers-without-peer-id": (["status", "--peers", "/ip4/127.0.0.1/tcp/1"], "no /p2p/PEER_ID"),
    "bootstrap-listen": (["bootstrap", "--listen", "tcp://0.0.0.0:31337"], "bad --listen"),
}


@pytest.mark.parametrize("case", list(ADDRESS_CASES))
def test_malformed_multiaddr_exits_2_naming_the_flag_before_anything_starts(case, capsys):
    args, message = ADDRESS_CASES[case]
    code = main(args)
    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, message)
    assert "e.g. /ip4/" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--round-timeout", "--join-timeout", "--heartbeat", "--leave-timeout", "--slowdown"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_start_refuses_a_time_or_factor_that_is_not_a_finite_number(flag, value, tmp_path, capsys):
    code = main(["start", "--index", "0", "--state-dir", str(tmp_path / "s"), flag, value])
    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, f"{flag} must be a finite number (got {value})")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--index", "4"], "--index 4 is past the run's 4 shares of --split: use 0-3"),  # was an IndexError
        (["--index", "2", "--nodes", "2", "--split", "0-4,5-9"], "--index 2 is past the run's 2 shares"),
        (["--index", "-2"], "--index is a position from 0 (got -2)"),
    ],
)
def test_start_refuses_an_index_outside_the_run_in_one_line(flags, message, tmp_path, capsys):
    code = main(["start", "--state-dir", str(tmp_path / "s"), *flags])
    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, message)


def test_a_checkpoint_that_is_not_weights_is_one_error_line_though_torch_explains_in_ten(tmp_path, capsys):
    key = tmp_path / "node.pem"  # torch.load's UnpicklingError for this runs to ten lines
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n")
    code = main(["simulate", *FAST, "--checkpoint", str(key)])
    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, f"checkpoint {key} is not a weights file")


PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmY6bp9t3vgyrMY9Z4ErWWv64Cw9z3BELbRmL94YWXVYSm"
RUN_ID_COMMANDS = {
    "start": ["start", "--index", "0"],
    "testnet": ["testnet", "--epochs", "1"],
    "bootstrap": ["bootstrap"],
    "status": ["status", "--peers", PEER],
    "revoke": ["revoke", "0123abcd", "--owner-key", "owner.pem", "--peers", PEER],
    "invite": ["invite", "--owner-key", "owner.pem", "--peer", PEER.rsplit("/", 1)[1]],
}


@pytest.mark.timeout(60)  # the old code started a daemon on some of these
@pytest.mark.parametrize("run_id", ["", "a b", "a/b", "runs.v2", "r\u00e9sum\u00e9", "x" * 65])
@pytest.mark.parametrize("command", list(RUN_ID_COMMANDS))
def test_every_command_refuses_a_run_id_start_would_refuse_before_anything_starts(command, run_id, capsys):
    code = main([*RUN_ID_COMMANDS[command], "--run-id", run_id])
    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, f"bad --run-id {run_id!r}")


def test_error_raised_inside_simulation_is_the_only_stderr_output(capsys):
    code = main(["simulate", *FAST, "--split", "0-1,2-3,4-6,7-12"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err == "error: class 10 is not in digits (it has classes 0-9)\n"


def test_help_exits_0_and_lists_simulate(capsys):
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert "simulate" in out
    assert not err.strip()


def test_simulate_help_exits_0_and_lists_options(capsys):
    assert main(["simulate", "--help"]) == 0
    out, _ = capsys.readouterr()
    for option in ("--split", "--topology", "--compare", "--checkpoint", "--json", "--plot"):
        assert option in out


def test_every_flag_with_choices_names_all_of_them_in_its_help():
    from dataclasses import fields

    from p2pnode.node.algorithms import ALGORITHMS
    from p2pnode.node.churn import ACTIONS
    from p2pnode.node.settings import NodeSettings, SimulateSettings, TestnetSettings
    from p2pnode.node.topology import TOPOLOGIES

    def help_of(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    for cls in (SimulateSettings, NodeSettings, TestnetSettings):
        assert all(name in help_of(cls, "algorithm") for name in ALGORITHMS), help_of(cls, "algorithm")
        assert all(t.split(":")[0] in help_of(cls, "topology") for t in TOPOLOGIES[:-1])
        for choice in ("none", "fp16", "bf16", "int8", "int8:BLOCK", "int4", "int4:BLOCK", "topk:FRACTION"):
            assert choice in help_of(cls, "codec")
    for cls in (SimulateSettings, TestnetSettings):
        assert all(action in help_of(cls, "churn") for action in ACTIONS)
        assert all(name in help_of(cls, "compare") for name in ALGORITHMS), help_of(cls, "compare")


# --- a short real run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    json_path, plot_path = out / "result.json", out / "result.png"
    code = main(
        [
            "simulate",
            "--epochs",
            "2",
            "--compare",
            "local,central,dsgd",
            "--json",
            str(json_path),
            "--plot",
            str(plot_path),
        ]
    )
    return code, json_path, plot_path


@pytest.mark.timeout(120)
def test_simulate_run_exits_0(run):
    code, json_path, plot_path = run
    assert code == 0
    assert json_path.is_file()
    assert plot_path.is_file()


@pytest.mark.timeout(120)  # runs the shared simulation when selected alone
def test_simulate_json_has_results_of_every_algorithm_and_settings(run):
    _, json_path, _ = run
    doc = json.loads(json_path.read_text())
    assert set(doc["results"]) == {"p2pft", "local", "central", "dsgd"}
    settings = doc["settings"]
    assert settings["epochs"] == 2
    assert settings["algorithm"] == "p2pft"
    assert settings["compare"] == ["local", "central", "dsgd"]
    assert settings["nodes"] == 4
    assert settings["split"] == "0-1,2-3,4-6,7-9"
    assert settings["model"] == "vit_digits"
    assert doc["fingerprint"] == build_model("vit_digits", num_classes=10).fingerprint


@pytest.mark.timeout(120)  # runs the shared simulation when selected alone
def test_simulate_json_accuracies_are_fractions_per_node(run):
    _, json_path, _ = run
    results = json.loads(json_path.read_text())["results"]
    for name, count in (("p2pft", 4), ("local", 4), ("central", 1), ("dsgd", 4)):
        acc = results[name]["accuracy"]
        assert len(acc) == count, name
        assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in acc), (name, acc)
        assert len(results[name]["history"]["accuracy"]) == 2  # one entry per epoch
    # local nodes never see 6+ of the 10 classes; with 360 test images their accuracy is at most 40 %
    assert max(results["local"]["accuracy"]) <= 0.4 + 1e-9
    # central training on all data beats chance clearly even after two epochs
    assert results["central"]["accuracy"][0] > 0.2


@pytest.mark.timeout(120)  # runs the shared simulation when selected alone
def test_simulate_json_counts_bytes_sent_per_node(run):
    _, json_path, _ = run
    results = json.loads(json_path.read_text())["results"]
    for name in ("p2pft", "local", "dsgd"):
        sent = results[name]["bytes_sent"]
        assert len(sent) == 4
        assert all(isinstance(b, int) for b in sent)
    assert results["local"]["bytes_sent"] == [0, 0, 0, 0]
    assert results["central"]["bytes_sent"] == [0]
    dsgd, p2pft = results["dsgd"]["bytes_sent"], results["p2pft"]["bytes_sent"]
    assert all(b > 0 for b in dsgd)
    # directed ring: one vector of the trainable size to one neighbour per iteration, in the default
    # codec int8: a byte per value and a float32 scale per block
    dim = build_model("vit_digits", num_classes=10).num_trainable
    assert dsgd == [results["dsgd"]["iterations"] * (dim + 4 * math.ceil(dim / DEFAULT_BLOCK))] * 4
    # P2P-FT sends two messages of that size per iteration (pull value, push mass)
    assert p2pft == [2 * b for b in dsgd]
    assert results["p2pft"]["iterations"] == results["dsgd"]["iterations"]


@pytest.mark.timeout(120)  # runs the shared simulation when selected alone
def test_simulate_plot_is_a_png(run):
    _, _, plot_path = run
    data = plot_path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG\r\n\x1a\n")


def test_start_help_shows_each_settings_default(capsys, monkeypatch):
    # Rich reads "[default: 50]" as a markup tag and drops it: the defaults must survive rendering
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["start", "--help"]) == 0
    out, _ = capsys.readouterr()
    text = " ".join(out.replace("│", " ").split())  # the help's words, without the table's wrapping
    assert "left out of the mix (its mass is kept) (default: 50)" in text
    assert "whatever mass has arrived (default: wait)" in text
    assert "(default: stdout)" not in text  # another command's option


CONFIG_CASES = {
    "text-for-a-whole-number": ('nodes = "four"\n', "setting nodes must be a whole number (got 'four')"),
    "fraction-for-a-whole-number": ("epochs = 1.5\n", "setting epochs must be a whole number"),
    "true-for-a-whole-number": ("epochs = true\n", "setting epochs must be a whole number"),
    "text-for-a-number": ('lr = "fast"\n', "setting lr must be a number"),
    "number-for-text": ("model = 5\n", "setting model must be a string"),
    "number-for-a-list": ("compare = 5\n", "setting compare must be a list"),
    "text-for-a-switch": ('pace-batch = "yes"\n', "setting pace_batch must be true or false"),
    "unknown-key": ("nodez = 4\n", "unknown setting 'nodez'"),
    "not-toml": ("epochs = = 1\n", "is not valid TOML"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_config_file_value_of_the_wrong_type_exits_2_in_one_line(case, tmp_path, capsys):
    text, message = CONFIG_CASES[case]
    config = tmp_path / "run.toml"
    config.write_text(text)
    code = main(["simulate", "--config", str(config)])
    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, message)


def test_a_config_path_that_is_a_folder_or_missing_is_named_for_what_it_is(tmp_path, capsys):
    assert main(["simulate", "--config", str(tmp_path)]) == 2
    assert_one_error_line(2, *capsys.readouterr(), f"config file {tmp_path} is not a file")  # it said "does not exist"
    assert main(["simulate", "--config", str(tmp_path / "none.toml")]) == 2
    assert_one_error_line(2, *capsys.readouterr(), "none.toml does not exist")


def test_a_config_file_gives_the_same_settings_as_the_flags(tmp_path):
    from p2pnode.node.settings import SimulateSettings, build_settings

    config = tmp_path / "run.toml"
    config.write_text('lr = 1\nepochs = 3\ncompare = ["local", "dsgd"]\nsync = "async"\nslow = "3:5"\n')
    from_file = build_settings(SimulateSettings, {}, config)
    flags = {"lr": 1.0, "epochs": 3, "compare": ["local,dsgd"], "sync": "async", "slow": ["3:5"]}
    assert from_file == build_settings(SimulateSettings, flags)
    assert isinstance(from_file.lr, float)


def test_an_output_path_that_cannot_be_written_exits_2_before_the_run(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [
        (["--json", str(tmp_path)], "--json"),  # a folder
        (["--json", str(a_file / "r.json")], "cannot write --json"),  # under a file
        (["--plot", str(tmp_path / "acc.txt")], "cannot write .txt images"),
        (["--plot", str(a_file / "acc.png")], "cannot write --plot"),
        (["--save", str(a_file)], "--save"),
    ]
    if Path("/proc/version").is_file():  # a folder that exists and takes no files: said so, not "No such file"
        cases.append((["--json", "/proc/version"], "cannot write --json /proc/version: /proc takes no new files"))
    for flags, message in cases:
        code = main(["simulate", *FAST, *flags])
        out, err = capsys.readouterr()
        assert out == "", (flags, out)  # no table: the run never started
        assert_one_error_line(code, out, err, message)


def test_version_prints_p2pnode_hivemind_and_torch_versions(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"p2pnode {version('p2pnode')} (hivemind {version('hivemind')}, torch {version('torch')})\n"


def test_ctrl_c_during_a_command_ends_it_with_one_line_and_exit_code_130(monkeypatch, capsys):
    """typer returns Ctrl-C as exit code 130 instead of raising it: the command exited 0, silently."""
    from p2pnode.node import simulator

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulator, "simulate", interrupted)
    code = main(["simulate", "--epochs", "1"])
    _, err = capsys.readouterr()
    assert code == 130 and err == "aborted\n", (code, err)


def test_a_testnet_that_fails_after_good_input_ends_in_one_line_with_exit_code_1(monkeypatch, capsys):
    from p2pnode.node import testnet
    from p2pnode.node.errors import RunFailed

    def late(*args, **kwargs):
        raise RunFailed("the testnet did not finish within 10 s (node 0 in, no pass done); logs in /tmp/t")

    monkeypatch.setattr(testnet, "run_testnet", late)
    code = main(["testnet", "--epochs", "1"])
    out, err = capsys.readouterr()
    assert (
        code == 1 and err == "error: the testnet did not finish within 10 s (node 0 in, no pass done); logs in /tmp/t\n"
    )
    assert "Traceback" not in out + err


def test_every_algorithms_row_is_named_by_its_label(capsys):
    """Tables, plots and attention grids name each algorithm by its `label` (before, only four had one:
    `sgp`, `cdsgd`, `dimat`, `wa` and `wm` showed their flag names beside `P2P-FT` and `D-PSGD`)."""
    from p2pnode.node.algorithms import ALGORITHMS, label_of

    assert all(cls.label and label_of(name) == cls.label for name, cls in ALGORITHMS.items())
    assert label_of("fedavg") == "fedavg"
    compared = ["dsgd", "cdsgd", "sgp", "wa", "wm", "dimat"]
    code = main(["simulate", *FAST, "--topology", "ring", "--merge-every", "1", "--compare", ",".join(compared)])
    out, _ = capsys.readouterr()
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert code == 0 and rows[: 1 + len(compared)] == ["P2P-FT", "D-PSGD", "CDSGD", "SGP", "WA", "WM", "DIMAT"], rows
