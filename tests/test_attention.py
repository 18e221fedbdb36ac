"""Saved models (`node/saved_models.py`) and last-block attention maps (`node/attention.py`, DESIGN §10)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.swin_transformer import window_partition

from p2pnode.node.attention import attention_maps, attention_report, last_attention, last_block, select_images
from p2pnode.node.errors import BadInput
from p2pnode.node.models import build_model
from p2pnode.node.saved_models import load_saved_models, save_models, save_simulation_run, save_state_dirs
from p2pnode.node.settings import NodeSettings, SimulateSettings
from p2pnode.node.state_store import StateStore

SPLIT = [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]


def perturbed(model, nodes: int, scale: float, seed: int) -> list[torch.Tensor]:
    """Each node's trainable vector: the initial one plus its own random perturbation (no training)."""
    g = torch.Generator().manual_seed(seed)
    base = model.trainable_vector()
    return [base + scale * torch.randn(base.shape, generator=g) for _ in range(nodes)]


@pytest.fixture(scope="module")
def digits_model():
    return build_model("vit_digits", num_classes=10)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, digits_model):
    """A `--save` directory: local and p2pft with 4 nodes, central with one, untrained but distinct."""
    root = tmp_path_factory.mktemp("saved")
    settings = SimulateSettings()
    save_models(root, "local", perturbed(digits_model, 4, 0.5, 1), digits_model, settings, SPLIT)
    save_models(root, "p2pft", perturbed(digits_model, 4, 0.05, 2), digits_model, settings, SPLIT)
    save_models(root, "central", perturbed(digits_model, 1, 0.05, 3), digits_model, settings, [list(range(10))])
    return root


def test_saving_and_loading_round_trips_parameters_exactly(tmp_path, digits_model):
    params = perturbed(digits_model, 3, 0.1, 0)
    save_models(tmp_path, "p2pft", [params[0], None, params[2]], digits_model, SimulateSettings(), [[0, 1], None, [5]])
    loaded = {s.node: s for s in load_saved_models(tmp_path)}
    assert sorted(loaded) == [0, 2]  # a node outside the run (None) is not written
    for i in (0, 2):
        assert torch.equal(loaded[i].params, params[i])
        assert loaded[i].algorithm == "p2pft" and loaded[i].fingerprint == digits_model.fingerprint
    assert loaded[0].classes == [0, 1] and loaded[2].classes == [5]
    meta = json.loads((tmp_path / "p2pft" / "node0.json").read_text())
    assert meta["model"] == "vit_digits" and meta["node"] == 0 and meta["settings"]["split"] == "0-1,2-3,4-6,7-9"
    # the tensors carry the full timm model's names: a timm model takes them as they are
    fresh = build_model("vit_digits", num_classes=10)
    result = fresh.model.load_state_dict(load_file(str(tmp_path / "p2pft" / "node2.safetensors")), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(fresh.trainable_vector(), params[2])


def test_daemon_state_dir_is_read_with_its_node_classes_and_exact_parameters(tmp_path, digits_model):
    settings = NodeSettings(index=2, classes="4-6", state_dir=str(tmp_path / "node2"))
    store = StateStore(
        tmp_path / "node2", {"run_id": "r", "fingerprint": digits_model.fingerprint, "settings_hash": "h"}
    )
    params = perturbed(digits_model, 1, 0.1, 7)[0]
    algorithm = SimpleNamespace(model_state_dict=lambda: {"params": params}, objective=None)
    store.save(algorithm, {"round": 5, "index": 0})  # index in state.json: the topology position, not the node
    store.write_json("result.json", {"settings": settings.to_dict()})
    store.close()
    (saved,) = load_saved_models([tmp_path / "node2"])
    assert (saved.algorithm, saved.node, saved.classes) == ("p2pft", 2, [4, 5, 6])
    assert torch.equal(saved.params, params)
    # testnet --save: the daemons' state directories copied into the --save layout
    save_state_dirs(tmp_path / "save", [tmp_path / "node2"], digits_model)
    (copied,) = load_saved_models(tmp_path / "save")
    assert (copied.algorithm, copied.node, copied.classes) == ("p2pft", 2, [4, 5, 6])
    assert torch.equal(copied.params, params) and (tmp_path / "save" / "p2pft" / "node2.json").is_file()
    save_state_dirs(tmp_path / "numbered", {5: tmp_path / "node2"}, digits_model)  # testnet names its nodes
    assert [s.node for s in load_saved_models(tmp_path / "numbered")] == [5]


def test_models_of_different_trunks_are_refused_with_one_line(tmp_path, digits_model):
    other = build_model("vit_digits", num_classes=10, seed=1)
    assert other.fingerprint != digits_model.fingerprint
    save_models(tmp_path / "a", "local", [digits_model.trainable_vector()], digits_model, SimulateSettings(), [[0]])
    save_models(tmp_path / "b", "p2pft", [other.trainable_vector()], other, SimulateSettings(model_seed=1), [[0]])
    with pytest.raises(BadInput, match="another trunk") as err:
        load_saved_models([tmp_path / "a", tmp_path / "b"])
    assert "\n" not in str(err.value)


# --- extraction on small random timm models --------------------------------------------------------

SMALL = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2), (4, 4)),
    "deit-distilled": (
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
        (4, 4),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4),
        (4, 4),
    ),
    # last stage 8x8 in 3x3 windows: padded to 9x9 and shifted by 1 (the general case)
    "swin-shifted-padded": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, patch_size=4, depths=(1, 2), num_heads=(1, 2), embed_dim=16, window_size=3),
        (8, 8),
    ),
}


def small_model(key: str):
    name, kw, _ = SMALL[key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kw), kw["img_size"]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("key", list(SMALL))
def test_maps_have_the_patch_grid_sum_to_one_and_leave_the_model_as_it_was(key, fused):
    model, size = small_model(key)
    model.train()
    attn = last_block(model).attn
    attn.fused_attn = fused
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    maps = attention_maps(model, x)
    assert maps.shape == (3, *SMALL[key][2])
    assert torch.allclose(maps.sum((1, 2)), torch.ones(3), atol=1e-5)
    assert (maps >= 0).all() and maps.std() > 0
    assert attn.fused_attn is fused and model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)  # unfused attention computes the same output


@pytest.mark.parametrize("key", ["vit", "deit-distilled"])
def test_vit_and_deit_maps_are_the_class_token_row_over_patches(key):
    model, size = small_model(key)
    model.eval()
    blk = last_block(model)
    seen = []
    hook = blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    maps = attention_maps(model, x)
    hook.remove()
    a = blk.attn
    tokens = blk.norm1(seen[0])
    b, n, c = tokens.shape
    qkv = a.qkv(tokens).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
    probs = ((qkv[0] * a.scale) @ qkv[1].transpose(-2, -1)).softmax(-1).mean(1)  # (B, N, N)
    prefix = model.num_prefix_tokens
    assert prefix == (2 if key == "deit-distilled" else 1)
    row = probs[:, 0, prefix:]
    expected = (row / row.sum(-1, keepdim=True)).reshape(b, 4, 4)
    assert torch.allclose(maps, expected.detach(), atol=1e-5)


def test_swin_maps_put_shifted_padded_windows_back_in_place():
    """Replace the last block's attention by one where every real query gives key k the weight
    id(k) + 1 (id: the token's row-major position in the unshifted grid) and padding queries look
    elsewhere; the map must be that grid."""
    model, size = small_model("swin-shifted-padded")
    blk = last_block(model)
    assert any(blk.shift_size) and 8 % blk.window_size[0] != 0
    h = w = 8
    ws, shift = tuple(blk.window_size), tuple(blk.shift_size)
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, h, w, 1)
    shifted = torch.roll(ids, shifts=(-shift[0], -shift[1]), dims=(1, 2))  # what timm's block does
    padded = torch.nn.functional.pad(shifted, (0, 0, 0, 9 - w, 0, 9 - h))
    key_ids = window_partition(padded, ws).reshape(-1, ws[0] * ws[1])  # (nW, N), 0 = padding
    real_queries = window_partition((padded > 0).float(), ws).reshape(-1, ws[0] * ws[1])

    def fake(_module, _inputs, probs):
        per_window = key_ids[:, None, :] * real_queries[:, :, None] / real_queries.sum(1)[:, None, None]
        per_window[:, :, 0] += 100.0 * (1 - real_queries)  # padding queries: cropped, so they must not count
        return per_window.repeat(probs.shape[0] // key_ids.shape[0], 1, 1)[:, None].expand_as(probs).clone()

    hook = blk.attn.softmax.register_forward_hook(fake)
    maps = attention_maps(model, torch.randn(2, 3, size, size))
    hook.remove()
    expected = ids[0, :, :, 0] / ids.sum()
    assert torch.allclose(maps, expected.expand(2, h, w), atol=1e-6)


def test_tail_hooks_see_the_fine_tuned_last_block(digits_model):
    """Through FineTuneModel.logits (functional_call), the map follows the vector given, not the model's own."""
    from p2pnode.node.attention import tail_attention

    x = torch.randn(2, *digits_model.input_size, generator=torch.Generator().manual_seed(3))
    features = digits_model.features(x)
    own, _ = tail_attention(digits_model, digits_model.trainable_vector(), features)
    with last_attention(digits_model.model) as cap, torch.no_grad():
        digits_model.model(x)
    assert torch.allclose(own, cap.maps(), atol=1e-6)
    other, _ = tail_attention(digits_model, perturbed(digits_model, 1, 0.5, 4)[0], features)
    assert not torch.allclose(own, other, atol=1e-4)


# --- the report ------------------------------------------------------------------------------------


def test_images_of_classes_the_node_never_saw_are_picked_by_default():
    labels = np.repeat(np.arange(10), 5)
    picked = select_images(labels, seen=[0, 1], count=6)
    chosen = labels[picked]
    assert sum(c not in (0, 1) for c in chosen) == 3 and sum(c in (0, 1) for c in chosen) == 3
    assert len(set(chosen[:3])) == 3  # unseen classes cycle before any repeats
    assert set(labels[select_images(labels, seen=[0, 1], count=4, classes=[7])]) == {7}


def test_grid_png_has_a_row_per_image_and_a_column_per_model_plus_the_original(saved_dir, tmp_path):
    from matplotlib.image import imread

    from p2pnode.node.attention import CELL_INCHES, DPI

    out = tmp_path / "grid.png"
    report = attention_report(saved_dir, out, images=3, node=1)
    assert report["columns"] == ["original", "local", "p2pft", "central"]
    assert report["layout"] == [3, 4]
    pixels = imread(out)
    assert pixels.shape[0] == round((CELL_INCHES * 3 + 0.8) * DPI)
    assert pixels.shape[1] == round((CELL_INCHES * 4 + 0.9) * DPI)
    rows = report["images"]
    assert [r["seen_by_node"] for r in rows] == [False, False, True]  # node 1 saw 2-3
    assert report["node_classes"] == [2, 3]


def test_json_has_every_map_and_similarity_one_for_central(saved_dir, tmp_path):
    report = attention_report(saved_dir, tmp_path / "g.png", tmp_path / "maps.json", images=4, classes="5-6")
    written = json.loads((tmp_path / "maps.json").read_text())
    assert written["similarity_to_central"]["central"] == pytest.approx(1.0)
    assert written["similarity_to_central"]["p2pft"] > written["similarity_to_central"]["local"]
    assert all(-1 <= v <= 1 + 1e-9 for v in written["similarity_to_central"].values())
    assert {r["label"] for r in written["images"]} == {5, 6}
    gh, gw = report["grid"]
    for row in written["images"]:
        assert set(row["maps"]) == {"local", "p2pft", "central"}
        for m in row["maps"].values():
            assert np.array(m).shape == (gh, gw) and abs(np.sum(m) - 1) < 1e-4


def test_a_node_no_algorithm_has_is_refused_with_one_line(saved_dir, tmp_path):
    with pytest.raises(BadInput, match="no node 7") as err:
        attention_report(saved_dir, tmp_path / "g.png", node=7)
    assert "\n" not in str(err.value)


def test_simulation_runs_are_saved_per_algorithm_and_read_back(tmp_path):
    from p2pnode.node.simulator import Simulation

    sim = Simulation(SimulateSettings(epochs=1, batch_size=512))
    for name in ("local", "central"):
        sim.run(name)
        save_simulation_run(tmp_path, sim, name)
        finals = [n.params.clone() for n in sim.nodes]
    saved = load_saved_models(tmp_path)
    assert sorted((s.algorithm, s.node) for s in saved) == [("central", 0)] + [("local", i) for i in range(4)]
    central = next(s for s in saved if s.algorithm == "central")
    assert torch.equal(central.params, finals[0].cpu()) and central.classes == list(range(10))
    assert next(s for s in saved if s.algorithm == "local" and s.node == 2).classes == [4, 5, 6]
    report = attention_report(tmp_path, tmp_path / "g.png", images=2, node=2)
    assert report["layout"] == [2, 3] and report["similarity_to_central"]["central"] == pytest.approx(1.0)


def test_a_reused_save_directory_holds_only_the_last_runs_models(tmp_path):
    from p2pnode.node.simulator import simulate

    simulate(SimulateSettings(epochs=1, batch_size=512, compare=["local"]).validate(), save=tmp_path)
    simulate(SimulateSettings(epochs=1, batch_size=512, nodes=2, split="0-4,5-9").validate(), save=tmp_path)
    saved = load_saved_models(tmp_path)  # was: p2pft nodes 2 and 3 and every local node of the first run too
    assert sorted((s.algorithm, s.node, s.settings["nodes"]) for s in saved) == [("p2pft", 0, 2), ("p2pft", 1, 2)]
    (kept,) = tmp_path.glob("set-aside-*")
    assert sorted(p.name for p in kept.iterdir()) == ["local", "p2pft"]
    assert len(load_saved_models(kept)) == 8  # the first run, readable where it was put


def test_attention_command_writes_the_png(saved_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from p2pnode.cli.attention_command import attention

    app = typer.Typer()
    app.command()(attention)
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(
        app, [str(saved_dir), "--out", str(out), "--images", "2", "--json", str(tmp_path / "j.json")]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and json.loads((tmp_path / "j.json").read_text())["columns"][0] == "original"
    assert "4x4 maps" in result.output and "note:" not in result.output  # the default model's maps are fine enough


def test_the_grid_is_written_in_the_format_its_suffix_names(saved_dir, tmp_path):
    attention_report(saved_dir, tmp_path / "grid.jpg", images=1)
    attention_report(saved_dir, tmp_path / "grid", images=1)
    assert (tmp_path / "grid.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG, not a PNG under a .jpg name
    assert (tmp_path / "grid").read_bytes()[:4] == b"\x89PNG"


def test_an_output_the_report_cannot_write_is_refused_before_any_model_is_read(tmp_path):
    missing = tmp_path / "no-models-here"  # read first, this would be the error
    with pytest.raises(BadInput, match=r"--out .*grid.xyz: cannot write .xyz images"):
        attention_report(missing, tmp_path / "grid.xyz")
    with pytest.raises(BadInput, match=r"--json .* is a folder"):
        attention_report(missing, tmp_path / "grid.png", json_path=tmp_path)
    assert not (tmp_path / "grid.png").exists()


def test_state_dirs_and_save_folders_mix_in_one_report(saved_dir, tmp_path, digits_model):
    params = perturbed(digits_model, 1, 0.05, 9)[0]
    state_dir = tmp_path / "daemon1"
    store = StateStore(state_dir, {"run_id": "r", "fingerprint": digits_model.fingerprint, "settings_hash": "h"})
    store.save(SimpleNamespace(model_state_dict=lambda: {"params": params}, objective=None), {"round": 1, "index": 3})
    settings = NodeSettings(index=1, state_dir=str(state_dir))  # its classes: its share of --split, 2-3
    store.events.write("start", peer_id="p", run_id="r", settings=settings.to_dict())  # no result.json: it left
    store.close()
    report = attention_report([saved_dir / "local", state_dir, saved_dir / "central"], tmp_path / "g.png", node=1)
    assert report["columns"] == ["original", "local", "p2pft", "central"]
    assert report["sources"]["p2pft"] == str(state_dir) and report["node_classes"] == [2, 3]


@pytest.mark.parametrize("name", ["vit_digits", "vit_digits_p2"])
def test_the_digits_models_give_a_4x4_map_with_a_fixed_sincos_position_embedding(name):
    model = build_model(name, num_classes=10)
    maps = attention_maps(model.model, torch.randn(3, 1, 8, 8))
    assert maps.shape == (3, 4, 4)
    assert torch.allclose(maps.sum((1, 2)), torch.ones(3), atol=1e-5)  # the class token's row over the patches
    again = build_model(name, num_classes=10, seed=1)  # another seed, the same position embedding
    assert torch.equal(model.model.pos_embed, again.model.pos_embed)
    assert not torch.equal(model.model.blocks[0].attn.qkv.weight, again.model.blocks[0].attn.qkv.weight)


def test_the_attention_command_suggests_finer_maps_where_the_grid_is_coarse(tmp_path):
    import typer
    from typer.testing import CliRunner

    from p2pnode.cli.attention_command import attention

    model = build_model("vit_digits_4px", num_classes=10)
    settings = SimulateSettings(model="vit_digits_4px")
    save_models(tmp_path / "p4", "p2pft", perturbed(model, 4, 0.05, 2), model, settings, SPLIT)
    save_models(tmp_path / "p4", "central", perturbed(model, 1, 0.05, 3), model, settings, [list(range(10))])
    app = typer.Typer()
    app.command()(attention)
    result = CliRunner().invoke(app, [str(tmp_path / "p4"), "--out", str(tmp_path / "p4.png"), "--images", "2"])
    assert result.exit_code == 0, result.output
    assert "2x2 maps" in result.output and "note:" in result.output and "--model vit_digits" in result.output


def test_each_map_cell_is_drawn_centred_on_the_pixels_its_patch_sees():
    from p2pnode.node.attention import map_extent

    # vit_digits: 5x5-pixel patches every pixel, so the 4 cells of a row are centred on pixels 2, 3, 4, 5
    assert map_extent(build_model("vit_digits", num_classes=10).model, 8, 8) == (1.5, 5.5, 5.5, 1.5)
    # side-by-side 4-pixel patches tile the image: cell centres on pixels 1.5 and 5.5
    assert map_extent(build_model("vit_digits_4px", num_classes=10).model, 8, 8) == (-0.5, 7.5, 7.5, -0.5)
    assert map_extent(build_model("vit_digits_p2", num_classes=10).model, 8, 8) == (-0.5, 7.5, 7.5, -0.5)


def test_another_runs_set_aside_checkpoint_is_not_read_as_a_model_of_this_run(tmp_path, digits_model):
    identity = {"run_id": "r", "fingerprint": digits_model.fingerprint, "settings_hash": "old"}
    old = StateStore(tmp_path / "node2", identity)
    old.save(SimpleNamespace(model_state_dict=lambda: {"params": digits_model.trainable_vector()}, objective=None), {})
    old.write_json("result.json", {"settings": NodeSettings(index=2, classes="4-6").to_dict()})
    old.close()
    StateStore(tmp_path / "node2", {**identity, "settings_hash": "new"}).close()  # a new run sets it aside
    with pytest.raises(BadInput, match="holds no saved models"):
        load_saved_models([tmp_path / "node2"])
    (kept,) = (tmp_path / "node2").glob("set-aside-*")
    assert [m.node for m in load_saved_models([kept])] == [2]  # named on its own, it is read


def test_p2pnodes_own_files_given_as_a_models_checkpoint_are_named_for_what_they_are(saved_dir, tmp_path, digits_model):
    # a user starting a new run from the last run's model: those files hold the trained block only
    identity = {"run_id": "r", "fingerprint": digits_model.fingerprint, "settings_hash": "h"}
    store = StateStore(tmp_path / "node0", identity)
    params = digits_model.trainable_vector()
    store.save(SimpleNamespace(model_state_dict=lambda: {"params": params}, objective=None), {"round": 5})
    store.close()
    for path in (tmp_path / "node0" / "state.safetensors", saved_dir / "p2pft" / "node1.safetensors"):
        with pytest.raises(BadInput, match=r"is p2pnode's own file \(a daemon's checkpoint or a --save model"):
            build_model("vit_digits", num_classes=10, checkpoint=path)


def test_a_file_given_where_a_saved_model_folder_goes_is_named_as_a_file(tmp_path):
    from p2pnode.node.errors import BadInput
    from p2pnode.node.saved_models import load_saved_models

    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(BadInput, match=r"notes\.txt is a file, not a saved model"):  # said "does not exist"
        load_saved_models([tmp_path / "notes.txt"])
