"""clip_model.py against open_clip (the reference CLIP), on random weights saved in the real formats."""

import socket
import string
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from safetensors.torch import save_file

import clip_model
import clip_weights
from clip_model import PRESETS, CLIPConfig, tokenize
from clip_weights import config_from_state_dict, load_clip, to_openai_state_dict

TINY = dict(
    embed_dim=64,
    vision=dict(layers=2, width=128, patch_size=8, image_size=32),
    text=dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=2),
)


def random_open_clip(name=None, quick_gelu=True, seed=0):
    """An open_clip CLIP with every tensor random (so zero-initialised biases are exercised too)."""
    torch.manual_seed(seed)
    if name is None:
        ref = open_clip.model.CLIP(
            TINY["embed_dim"], CLIPVisionCfg(**TINY["vision"]), CLIPTextCfg(**TINY["text"]), quick_gelu=quick_gelu
        )
    else:
        ref = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    return ref.eval()


def save(ref, path, fmt):
    sd = ref.state_dict()
    if fmt == "pt":
        torch.save(sd, path)
    elif fmt == "wrapped":  # training-checkpoint style: {'state_dict': {'module.' + key: ...}}
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items() if "attn_mask" not in k}, str(path))
    elif fmt == "torchscript":
        torch.jit.script(ref).save(str(path))


def assert_same_features(ref, ours, image_size, context_length, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, image_size, image_size, generator=g)
    tokens = tokenize(["a photo of a cat.", "Ünïcødé & punctuation!?", "x " * 200], context_length)
    with torch.no_grad():
        for a, b in [
            (ref.encode_image(images), ours.encode_image(images)),
            (ref.encode_text(tokens), ours.encode_text(tokens)),
        ]:
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()


EXT = {"pt": ".pt", "wrapped": ".pth", "safetensors": ".safetensors", "torchscript": ".pt"}


@pytest.mark.parametrize("fmt", list(EXT))
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_tiny_equals_open_clip_in_every_format(tmp_path, fmt, quick_gelu):
    ref = random_open_clip(quick_gelu=quick_gelu)
    path = tmp_path / f"tiny{EXT[fmt]}"
    save(ref, path, fmt)
    ours = load_clip(path, quick_gelu=None if fmt == "torchscript" else quick_gelu)
    if fmt == "torchscript":  # archives are OpenAI's: QuickGELU is implied
        assert ours.config.quick_gelu
        if not quick_gelu:
            return
    assert ours.config.quick_gelu == quick_gelu
    assert_same_features(ref, ours, 32, 16)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript"])
def test_vit_b16_openai_shapes_equal_open_clip(tmp_path, fmt):
    ref = random_open_clip("ViT-B-16-quickgelu")
    path = tmp_path / f"ViT-B-16{EXT[fmt]}"
    save(ref, path, fmt)
    ours = load_clip(path, config="ViT-B-16")
    assert ours.config == PRESETS["ViT-B-16"]
    assert_same_features(ref, ours, 224, 77)


def test_export_round_trip_is_exact(tmp_path):
    ref = random_open_clip()
    sd = {k: v for k, v in ref.state_dict().items() if "attn_mask" not in k}
    ours = load_clip(_saved(tmp_path, ref))
    back = to_openai_state_dict(ours)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    clip_weights.save_clip(ours, tmp_path / "export.safetensors")
    again = load_clip(tmp_path / "export.safetensors")
    assert again.config == ours.config
    ref.load_state_dict(to_openai_state_dict(again), strict=False)  # open_clip takes the same names
    assert_same_features(ref, again, 32, 16)


VISUAL_TOP = {"conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"}


def test_toy_preset_round_trip(tmp_path):
    """The toy preset (one linear patch embedding before the blocks, as CLIP's) saves under OpenAI's
    names and loads back as itself, told apart from tiny by its shapes."""
    torch.manual_seed(0)
    model = clip_model.CLIP(PRESETS["toy"]).eval()
    names = to_openai_state_dict(model)
    assert names["visual.conv1.weight"].shape == (128, 3, 8, 8)
    assert not [n for n in names if n.startswith("visual.") and n.split(".")[1] not in VISUAL_TOP]
    clip_weights.save_clip(model, tmp_path / "toy.safetensors")
    again = load_clip(tmp_path / "toy.safetensors")
    assert again.config == PRESETS["toy"]
    images, tokens = torch.randn(3, 3, 32, 32), tokenize(["a red star.", "a ring.", "a sketch of a bolt."], 20)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(again.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected tiny"):
        load_clip(tmp_path / "toy.safetensors", config="tiny")


def _saved(tmp_path, ref, name="m.pt"):
    path = tmp_path / name
    torch.save(ref.state_dict(), path)
    return path


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "tiny", "toy"])
def test_config_inferred_from_shapes(name):
    with torch.device("meta"):  # shapes only, no allocation
        model = clip_model.CLIP(PRESETS[name])
    assert config_from_state_dict(to_openai_state_dict(model)) == PRESETS[name]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)
        | st.text(alphabet=string.printable, max_size=400),
        min_size=1,
        max_size=4,
    )
)
def test_tokenizer_ids_equal_open_clip(texts):
    ours = tokenize(texts)
    assert torch.equal(ours, open_clip.tokenize(texts))
    assert ours.shape == (len(texts), 77)
    sot, eot = 49406, 49407
    assert (ours[:, 0] == sot).all()
    eot_at = ours.argmax(-1)  # EOT is the last token; only padding follows it
    assert all((row[i + 1 :] == 0).all() for row, i in zip(ours, eot_at.tolist()))
    assert (ours.max(-1).values == eot).all()


def test_long_text_truncated_with_eot_kept():
    tokens = tokenize(["word " * 500], context_length=16)
    assert tokens.shape == (1, 16) and tokens[0, -1] == 49407 and (tokens != 0).all()


def test_truncated_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path, random_open_clip())
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="m.pt.*cannot read"):
        load_clip(path)
    st_path = tmp_path / "t.safetensors"
    save(random_open_clip(), st_path, "safetensors")
    st_path.write_bytes(st_path.read_bytes()[:3000])
    with pytest.raises(ValueError, match="t.safetensors"):
        load_clip(st_path)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    with torch.device("meta"):
        b32 = clip_model.CLIP(PRESETS["ViT-B-32"])
    sd = {k: torch.zeros(v.shape) for k, v in to_openai_state_dict(b32).items()}
    path = tmp_path / "b32.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="ViT-B-32.*expected ViT-B-16"):
        load_clip(path, config="ViT-B-16")


def test_non_clip_and_missing_keys_are_clear_errors(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(ValueError, match="not a CLIP"):
        load_clip(path)
    sd = random_open_clip().state_dict()
    del sd["transformer.resblocks.1.mlp.c_proj.bias"]
    sd["visual.extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing text\.blocks\.1\.mlp\.fc2\.bias.*unexpected visual\.extra\.weight"):
        load_clip(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_clip(path)


def test_hub_name_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_weights, "CACHE_DIR", tmp_path)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(
        clip_weights.WeightsError, match=r"cannot download .*ViT-B-16\.pt \(no network.*" + str(tmp_path)
    ):
        load_clip("ViT-B-16:openai")
    with pytest.raises(clip_weights.WeightsError, match="not a known model name"):
        load_clip("ViT-H-99")


def test_hub_name_uses_cached_file(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_weights, "CACHE_DIR", tmp_path)
    ref = random_open_clip()
    torch.save(ref.state_dict(), tmp_path / "ViT-B-16.pt")  # any CLIP file under the expected name
    assert_same_features(ref, load_clip("ViT-B-16"), 32, 16)


def test_image_transform():
    image = Image.new("L", (50, 40), color=128)  # grey, single channel: converted to RGB
    for train in (False, True):
        x = clip_model.image_transform(32, train=train)(image)
        assert x.shape == (3, 32, 32)
        expected = (128 / 255 - torch.tensor(clip_model.CLIP_MEAN)) / torch.tensor(clip_model.CLIP_STD)
        torch.testing.assert_close(x.mean((1, 2)), expected, atol=1e-2, rtol=0)


def crop_areas(scale, draws=60):
    """The share of the image area each training crop of image_transform(scale=...) covers, read off the
    output of an image whose red channel is its x coordinate and green channel its y coordinate."""
    xy = np.stack(np.meshgrid(np.arange(256), np.arange(256)), axis=-1)  # [H, W, 2]: (x, y) per pixel
    image = Image.fromarray(np.concatenate([xy, np.zeros_like(xy[..., :1])], -1).astype(np.uint8))
    transform = clip_model.image_transform(32, train=True, scale=scale)
    mean, std = torch.tensor(clip_model.CLIP_MEAN)[:2, None, None], torch.tensor(clip_model.CLIP_STD)[:2, None, None]
    torch.manual_seed(0)
    areas = []
    for _ in range(draws):
        x, y = 255 * (transform(image)[:2] * std + mean)  # the coordinates the crop covers, [32, 32] each
        # the 32 output pixels sample the crop at their centres: their span is 31/32 of the crop's side
        areas.append(float((x.max() - x.min()) * (y.max() - y.min())) * (32 / 31) ** 2 / 256**2)
    return areas


def test_training_crop_covers_the_share_of_the_image_its_scale_says():
    """R-Adapter's crop, scale (0.9, 1), keeps nearly the whole image; Dassl's, (0.08, 1), draws small crops too."""
    r_adapter = crop_areas((0.9, 1.0))
    assert min(r_adapter) > 0.88
    dassl = crop_areas((0.08, 1.0))
    assert min(dassl) < 0.3 and max(dassl) > 0.6


def test_forward_returns_normalised_features_and_scale():
    torch.manual_seed(0)
    model = clip_model.CLIP(CLIPConfig(**{**PRESETS["tiny"].__dict__, "vocab_size": 1000})).eval()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 999, (2, 20))
    f, g, s = model(images, tokens)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2))
    assert torch.isclose(s, torch.tensor(1 / 0.07))


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_dense_class_token_is_encode_image_at_the_native_size(preset):
    """With the plain last block (last_block="attention"); the release's is tested in test_segment.py."""
    torch.manual_seed(0)
    model = clip_model.CLIP(PRESETS[preset]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense, features = model.encode_dense(images, blocks=[0, 2], last_block="attention")
        assert dense.shape == (2, 1 + 4 * 4, model.config.embed_dim)
        assert [f.shape for f in features] == [(2, model.config.vision_width, 4, 4)] * 2
        torch.testing.assert_close(dense[:, 0], model.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_dense(images, last_block="attention")[0], dense, rtol=0, atol=0)


def test_dense_at_another_size_is_a_model_built_for_it_and_blocks_are_block_outputs():
    """At 48 px the dense path equals a CLIP built for 48 px holding the same weights with the position
    embeddings resampled (timm's resample_abs_pos_embed without antialiasing, as CAT-Seg's release resamples
    them); the intermediates are what the blocks output."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    model = clip_model.CLIP(PRESETS["tiny"]).eval()
    big = clip_model.CLIP(replace(PRESETS["tiny"], image_size=48)).eval()
    state = model.state_dict()
    state["visual.pos_embed"] = resample_abs_pos_embed(state["visual.pos_embed"], (6, 6), (4, 4), antialias=False)
    big.load_state_dict(state)
    images = torch.randn(2, 3, 48, 48)
    outputs = []
    hooks = [model.visual.blocks[i].register_forward_hook(lambda m, i, o: outputs.append(o)) for i in (1, 3)]
    with torch.no_grad():
        dense, features = model.encode_dense(images, blocks=[1, 3], last_block="attention")
        torch.testing.assert_close(dense[:, 0], big.encode_image(images), rtol=0, atol=1e-6)
    for hook in hooks:
        hook.remove()
    assert dense.shape == (2, 1 + 6 * 6, 128)
    for feature, output in zip(features, outputs):  # [N, 1 + 36, width] -> patch tokens as [N, width, 6, 6]
        torch.testing.assert_close(feature, output[:, 1:].transpose(1, 2).reshape(2, 128, 6, 6), rtol=0, atol=0)
