"""`build_model`: frozen trunk + trainable tail for ViT/DeiT/Swin, fingerprints and local checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer

from p2pnode.node.errors import BadInput
from p2pnode.node.models import DEFAULT_MODEL, FineTuneModel, build_model

# model name -> prefix of the last transformer block (for Swin: the last block of the last stage)
LAST_BLOCK = {
    "vit_small_patch16_224": "blocks.11.",
    "deit_small_patch16_224": "blocks.11.",
    "swin_small_patch4_window7_224": "layers.3.blocks.1.",
    "vit_digits": "blocks.3.",
}
NUM_CLASSES = 7


@pytest.fixture(scope="module", params=list(LAST_BLOCK))
def built(request) -> FineTuneModel:
    """Each model is built once per module (random weights, they are slow to build on CPU)."""
    return build_model(request.param, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def batch_output(built):
    """A random batch of 2, the full timm model's output on it and the trunk's (computed once: slow on CPU)."""
    x = torch.randn(2, *built.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, built.model(x), built.features(x)  # features(x) is trunk(x) without autograd


def trainable_names(m: FineTuneModel) -> set[str]:
    return {n for n, p in m.model.named_parameters() if p.requires_grad}


def tail_prefixes(name: str) -> tuple[str, ...]:
    head = "head.fc." if name.startswith("swin") else "head."
    return (LAST_BLOCK[name], "norm.", head)


@pytest.mark.timeout(120)
def test_only_last_block_final_norm_and_head_require_grad(built):
    names = {n for n, _ in built.model.named_parameters()}
    expected = {n for n in names if n.startswith(tail_prefixes(built.name))}
    assert trainable_names(built) == expected
    # the last block, the final norm and the head all contribute
    for prefix in tail_prefixes(built.name):
        assert any(n.startswith(prefix) for n in expected), prefix
    # the tail module holds exactly these parameters, and nothing else of the model is trainable
    trainable = {id(p) for p in built.model.parameters() if p.requires_grad}
    assert {id(p) for p in built.tail.parameters()} == trainable
    assert built.num_trainable == sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    assert built.trainable_vector().numel() == built.num_trainable
    assert not built.model.training  # dropout and drop-path off, so cached features match


@pytest.mark.timeout(120)
def test_head_has_requested_class_count(built, batch_output):
    _, out, _ = batch_output
    assert built.num_classes == NUM_CLASSES
    assert built.model.get_classifier().out_features == NUM_CLASSES
    assert out.shape == (2, NUM_CLASSES)


@pytest.mark.timeout(120)
def test_tail_of_trunk_equals_full_model_output(built, batch_output):
    _, expected, trunk_out = batch_output
    with torch.no_grad():
        split = built.tail(trunk_out)
    assert split.shape == expected.shape
    assert (split - expected).abs().max().item() <= 1e-5


@pytest.mark.timeout(120)
def test_logits_from_flat_trainable_vector_equal_full_model_output(built, batch_output):
    _, expected, features = batch_output
    with torch.no_grad():
        logits = built.logits(built.trainable_vector(), features)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_default_model_is_vit_digits_for_8x8_grayscale():
    m = build_model()
    assert DEFAULT_MODEL == "vit_digits"
    assert m.name == "vit_digits"
    assert m.input_size == (1, 8, 8)
    assert m.num_classes == 10
    assert m.model.get_classifier().out_features == 10


def test_two_trainable_blocks_make_last_two_blocks_trainable():
    m = build_model("vit_digits", trainable_blocks=2)
    names = trainable_names(m)
    assert any(n.startswith("blocks.2.") for n in names)
    assert any(n.startswith("blocks.3.") for n in names)
    assert not any(n.startswith(("blocks.0.", "blocks.1.")) for n in names)
    assert len(m.tail.blocks) == 2
    x = torch.randn(2, *m.input_size)
    with torch.no_grad():
        assert (m.tail(m.trunk(x)) - m.model(x)).abs().max().item() <= 1e-5


@pytest.mark.timeout(120)
def test_two_trainable_blocks_on_swin_make_whole_last_stage_trainable():
    m = build_model("swin_small_patch4_window7_224", num_classes=3, trainable_blocks=2)
    names = trainable_names(m)
    assert any(n.startswith("layers.3.blocks.0.") for n in names)
    assert any(n.startswith("layers.3.blocks.1.") for n in names)
    assert not any(n.startswith(("layers.0.", "layers.1.", "layers.2.", "layers.3.downsample")) for n in names)
    x = torch.randn(1, *m.input_size)
    with torch.no_grad():
        assert (m.tail(m.trunk(x)) - m.model(x)).abs().max().item() <= 1e-5


def test_more_trainable_blocks_than_exist_raises_bad_input():
    with pytest.raises(BadInput, match="exceeds the 4 blocks"):
        build_model("vit_digits", trainable_blocks=5)


@pytest.mark.timeout(120)
def test_more_trainable_blocks_than_swin_last_stage_has_raises_bad_input():
    with pytest.raises(BadInput, match="exceeds the 2 blocks"):
        build_model("swin_small_patch4_window7_224", trainable_blocks=3)


def test_zero_trainable_blocks_raises_bad_input():
    with pytest.raises(BadInput, match="at least 1"):
        build_model("vit_digits", trainable_blocks=0)


def test_unknown_model_name_raises_bad_input_with_suggestion():
    with pytest.raises(BadInput, match=r"did you mean .*vit_small_patch16_224"):
        build_model("vit_smal_patch16_224")


@pytest.mark.timeout(120)
def test_model_name_with_pretrained_tag_is_accepted():
    m = build_model("deit_small_patch16_224.fb_in1k", num_classes=3)
    assert m.model.get_classifier().out_features == 3


def test_unknown_model_name_without_near_match_points_to_default():
    with pytest.raises(BadInput, match="vit_digits"):
        build_model("qqqqqqqqqqqqqqqqqqqqqq")


# --- fingerprint --------------------------------------------------------------------------------


def test_fingerprint_identical_for_two_builds_with_same_seed():
    a, b = build_model("vit_digits", seed=3), build_model("vit_digits", seed=3)
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 16
    int(a.fingerprint, 16)  # hex digest


def test_builds_with_same_seed_have_identical_weights():
    a, b = build_model("vit_digits", seed=3), build_model("vit_digits", seed=3)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fingerprint_differs_with_another_model_seed():
    assert build_model("vit_digits", seed=0).fingerprint != build_model("vit_digits", seed=1).fingerprint


def test_fingerprint_unchanged_when_only_tail_and_head_weights_change(tmp_path):
    base = build_model("vit_digits")
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    for k in state:
        if k.startswith(tail_prefixes("vit_digits")):
            state[k] += 1.0
    path = tmp_path / "tail_changed.safetensors"
    save_file(state, str(path))
    loaded = build_model("vit_digits", checkpoint=path)
    assert torch.equal(loaded.model.head.weight, state["head.weight"])  # the change did arrive
    assert not torch.equal(loaded.trainable_vector(), base.trainable_vector())
    assert loaded.fingerprint == base.fingerprint


def test_fingerprint_changes_when_a_trunk_weight_changes(tmp_path):
    base = build_model("vit_digits")
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    state["blocks.0.attn.qkv.weight"][0, 0] += 1.0
    path = tmp_path / "trunk_changed.safetensors"
    save_file(state, str(path))
    assert build_model("vit_digits", checkpoint=path).fingerprint != base.fingerprint


# --- checkpoints --------------------------------------------------------------------------------


def trunk_state(m: FineTuneModel) -> dict[str, torch.Tensor]:
    tail = {id(p) for p in m.tail.parameters()}
    return {k: v for k, v in m.model.state_dict(keep_vars=True).items() if id(v) not in tail}


def assert_trunk_equals(m: FineTuneModel, state: dict[str, torch.Tensor]) -> None:
    trunk = trunk_state(m)
    assert trunk, "the model must have trunk weights"
    for k, v in trunk.items():
        assert torch.equal(v.detach(), state[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped"])
def test_checkpoint_loads_trunk_weights_from_file(tmp_path, fmt):
    source = build_model("vit_digits", seed=11)
    state = {k: v.detach().clone() for k, v in source.model.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save({"state_dict": state} if fmt == "pt-wrapped" else state, path)
    m = build_model("vit_digits", seed=0, checkpoint=str(path))
    assert build_model("vit_digits", seed=0).fingerprint != source.fingerprint  # the seeds alone differ
    assert_trunk_equals(m, state)
    assert torch.equal(m.model.head.weight, state["head.weight"])
    assert m.fingerprint == source.fingerprint


def test_checkpoint_with_other_head_class_count_loads_with_head_skipped(tmp_path):
    source = build_model("vit_digits", num_classes=10, seed=11)
    state = {k: v.detach().clone() for k, v in source.model.state_dict().items()}
    path = tmp_path / "ten_classes.safetensors"
    save_file(state, str(path))
    m = build_model("vit_digits", num_classes=3, seed=0, checkpoint=path)
    assert m.model.head.weight.shape == (3, 64)
    assert m.model.head.bias.shape == (3,)
    assert_trunk_equals(m, state)
    # the block and norm of the tail come from the file too; only the head is new
    assert torch.equal(m.model.norm.weight, state["norm.weight"])
    assert torch.equal(m.model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])
    assert m.fingerprint == source.fingerprint


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("wider-vit", "does not fit the model"),
        ("shallower-vit", "lacks"),
        ("deeper-vit", "unknown tensors"),
        ("swin", "does not fit the model"),
    ],
)
def test_checkpoint_from_another_architecture_raises_bad_input(tmp_path, kind, message):
    if kind == "wider-vit":
        other = timm.create_model("vit_digits", embed_dim=32, num_heads=4)
    elif kind == "shallower-vit":
        other = timm.create_model("vit_digits", depth=2)
    elif kind == "deeper-vit":
        other = timm.create_model("vit_digits", depth=6)
    else:
        other = SwinTransformer(
            img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=10
        )
    path = tmp_path / f"{kind}.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(BadInput, match=message):
        build_model("vit_digits", checkpoint=path)


def test_missing_checkpoint_file_raises_bad_input(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        build_model("vit_digits", checkpoint=tmp_path / "nope.safetensors")


def test_unreadable_checkpoint_file_raises_bad_input(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BadInput, match="is not a weights file"):
        build_model("vit_digits", checkpoint=path)


def test_pretrained_weights_out_of_reach_end_in_one_line_without_the_hub_clients_retry_log(monkeypatch):
    """Without internet the hub client logged 'Retrying in Ns [Retry k/5]' at every retry before that line."""
    import logging

    def offline(name, pretrained=False, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 3/5].")
        raise OSError("no route to huggingface.co")

    logged: list[logging.LogRecord] = []
    seen = logging.Handler()
    seen.emit = logged.append
    hub = logging.getLogger("huggingface_hub")  # where the client's own stderr handler sits
    hub.addHandler(seen)
    monkeypatch.setattr(timm, "create_model", offline)
    try:
        with pytest.raises(BadInput, match="could not load pretrained weights for vit_small_patch16_224"):
            build_model("vit_small_patch16_224", pretrained=True)
    finally:
        hub.removeHandler(seen)
    assert [r.getMessage() for r in logged] == []
    assert hub.level != logging.ERROR  # quieted only while loading
