"""open_clip teacher: image-tower triple, zero-shot head, checkpoints (tiny local configs, no downloads)."""

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from kd3.cli import main as kd3_main
from kd3.errors import Kd3Error
from kd3.models import build_model, load_model, save_checkpoint
from kd3.models.clip import build_zeroshot_teacher, zeroshot_weights

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_VIT, TINY_VIT_AVG, TINY_RN = "kd3-tiny-vit", "kd3-tiny-vit-avg", "kd3-tiny-rn"
CLASSES = ["cat", "dog", "truck"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


@pytest.fixture(scope="module", autouse=True)
def tiny_configs():
    for name in (TINY_VIT, TINY_VIT_AVG, TINY_RN):
        open_clip.add_model_config(FIXTURES / f"{name}.json")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A 'pretrained' tiny CLIP saved as a plain state dict (what a local weights file looks like)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny_vit.pt"
    torch.save(open_clip.create_model(TINY_VIT, pretrained=None).state_dict(), path)
    return path


@pytest.mark.parametrize("name, size, align, grid", [
    (TINY_VIT, 32, False, (64, 4, 4)),      # patch 8 → 4x4 grid of width-64 tokens
    (TINY_VIT_AVG, 32, True, (64, 4, 4)),
    (TINY_RN, 64, True, (256, 2, 2)),       # ModifiedResNet trunk before attnpool: 32·width channels, /32
])
def test_image_tower_triple(name, size, align, grid):
    torch.manual_seed(0)
    model = build_model(f"open_clip/{name}", 3, 3).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model.extract(x)
        embedding = model.visual(x)  # = CLIP.encode_image
        assert out.feature_map.shape == (2, *grid) and model.feature_channels == grid[0]
        torch.testing.assert_close(out.pooled, embedding)
        assert out.pooled.shape == (2, model.feature_dim) == (2, 32)
        assert out.logits.shape == (2, 3)
        torch.testing.assert_close(model(x), out.logits)
        assert model.supports_feature_alignment is align
        if align:
            torch.testing.assert_close(model.head(out.feature_map), out.logits, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(Kd3Error, match="pools its class token.*open_clip/RN50"):
                model.head(out.feature_map)


def test_zeroshot_teacher_matches_clip_and_reloads(tmp_path, tiny_weights):
    model, meta = build_zeroshot_teacher(TINY_VIT, CLASSES, TEMPLATES, pretrained=str(tiny_weights))
    clip = open_clip.create_model(TINY_VIT, pretrained=str(tiny_weights)).eval()  # the local-file path
    tokenizer = open_clip.get_tokenizer(TINY_VIT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # the reference recipe, written out: per class, normalise each prompt, average, normalise
        w = torch.stack([F.normalize(F.normalize(clip.encode_text(tokenizer([t.format(c) for t in TEMPLATES])),
                                                 dim=-1).mean(0), dim=-1) for c in CLASSES])
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ w.T
        torch.testing.assert_close(zeroshot_weights(clip, tokenizer, CLASSES, TEMPLATES), w)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert meta.arch == f"open_clip/{TINY_VIT}" and meta.class_names == CLASSES
    assert meta.options["head"] == "zeroshot" and meta.options["templates"] == TEMPLATES
    assert meta.input.image_size == 32 and meta.input.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    save_checkpoint(tmp_path / "teacher.pt", model, meta)
    state = torch.load(tmp_path / "teacher.pt", weights_only=True)["state_dict"]
    assert "zeroshot_weights" in state and not any(k.startswith(("transformer.", "token_embedding")) for k in state)
    loaded, loaded_meta, _ = load_model(tmp_path / "teacher.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.extract(x).pooled, model.extract(x).pooled)
    assert loaded_meta == meta


def test_zeroshot_checkpoint_is_self_contained(tmp_path, tiny_weights):
    """The model config travels in the options: a process that never registered the JSON can load it."""
    model, meta = build_zeroshot_teacher(TINY_RN, CLASSES, TEMPLATES)
    save_checkpoint(tmp_path / "t.pt", model, meta)
    payload = torch.load(tmp_path / "t.pt", weights_only=True)
    payload["model"]["arch"] = "open_clip/kd3-never-registered"
    torch.save(payload, tmp_path / "renamed.pt")
    loaded, _, _ = load_model(tmp_path / "renamed.pt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_zeroshot_teacher_command(tmp_path, tiny_weights, capsys):
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    args = ["zeroshot-teacher", "--model", TINY_VIT, "--model-config", str(FIXTURES / f"{TINY_VIT}.json"),
            "--pretrained", str(tiny_weights), "--classes", str(tmp_path / "classes.txt"),
            "--templates", str(tmp_path / "templates.txt"), "--out", str(tmp_path / "teacher.pt")]
    assert kd3_main(args) == 0
    out = capsys.readouterr().out
    assert "3 classes x 2 templates" in out and "KD³ feature alignment: no" in out
    teacher, meta, payload = load_model(tmp_path / "teacher.pt")
    assert meta.class_names == CLASSES and payload["zeroshot"]["pretrained"] == str(tiny_weights)
    assert kd3_main(args) == 2 and "already exists" in capsys.readouterr().err
    (tmp_path / "templates.txt").write_text("a photo\n")
    assert kd3_main(args + ["--overwrite"]) == 2
    assert "template 1 'a photo' has no '{}' placeholder" in capsys.readouterr().err


@pytest.mark.parametrize("pretrained, expected", [
    ("no_such_tag", "pretrained 'no_such_tag' is neither a file nor a known tag"),
    ("evil", "could not load pretrained=.*pickled .*NotWeights object"),
])
def test_bad_pretrained_is_a_clear_error(tmp_path, pretrained, expected):
    if pretrained == "evil":
        torch.save({"visual": NotWeights()}, tmp_path / "evil.pt")
        pretrained = str(tmp_path / "evil.pt")
    with pytest.raises(Kd3Error, match=expected) as info:
        build_zeroshot_teacher(TINY_VIT, CLASSES, TEMPLATES, pretrained=pretrained)
    assert "\n" not in str(info.value)


class NotWeights:
    """Any object a weights-only loader must refuse."""


def test_open_clip_options_are_checked():
    with pytest.raises(Kd3Error, match="3-channel RGB"):
        build_model(f"open_clip/{TINY_VIT}", 3, 1)
    with pytest.raises(Kd3Error, match="class_names has 2 names for 3 classes"):
        build_model(f"open_clip/{TINY_VIT}", 3, 3, {"class_names": ["a", "b"]})
    with pytest.raises(Kd3Error, match="head must be 'linear' or 'zeroshot'"):
        build_model(f"open_clip/{TINY_VIT}", 3, 3, {"head": "mlp"})
