"""core.explain.gradcam: Captum Grad-CAM maps, overlays, example choice and galleries, on a resnet18 built here.

(The trained model's maps are checked in test_final_train.py, on the final training's model.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.explain.gradcam import OUTLINE_COLOR, Explainable, GradcamOptions, choose_examples, choose_layer, coarse_map_note, explain_evaluation, gradcam_maps, map_side, outline, overlay, save_overlay, stage_side, write_galleries
from core.model.networks import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(3, "none").eval()


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def test_maps_have_the_image_size_and_hooks_are_released(model: torch.nn.Module, monkeypatch) -> None:
    import core.explain.gradcam

    monkeypatch.setattr(core.explain.gradcam, "BATCH_SIZE", 2)
    images = _images(5, 64)
    before = _hook_count(model)
    maps = gradcam_maps(model, images, [0, 1, 2, 0, 1])  # batches of 2, 2 and 1
    assert maps.shape == (5, 64, 64) and maps.dtype == np.float32
    assert np.all(maps >= 0) and np.all(maps <= 1)
    assert all(np.isclose(m.max(), 1.0) or m.max() == 0 for m in maps)
    assert _hook_count(model) == before == 0
    assert all(p.grad is None for p in model.parameters())  # nothing left accumulated on the model
    assert not model.training


def test_maps_match_captum_and_depend_on_the_target(model: torch.nn.Module) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    from core.model.forward import normalize

    images = _images(2, 64, seed=1)
    ours = gradcam_maps(model, images, [1, 2], layer="layer4", method="gradcam")
    raw = LayerGradCam(model, model.layer4).attribute(normalize(torch.as_tensor(images)),
                                                      target=torch.tensor([1, 2]), relu_attributions=True)
    assert raw.shape[-2:] == (2, 2)  # 64 px -> a 2x2 map in layer4
    up = LayerAttribution.interpolate(raw, (64, 64), interpolate_mode="bilinear")[:, 0].detach().numpy()
    expected = up / np.maximum(up.reshape(2, -1).max(1), 1e-30)[:, None, None]
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert all(m.std() > 0 for m in ours)  # bilinear from 2x2: not constant
    assert not np.allclose(gradcam_maps(model, images[:1], [0], layer="layer4", method="gradcam"), ours[:1])


def test_works_inside_no_grad_and_on_a_tensor(model: torch.nn.Module) -> None:
    images = _images(2, 48)
    with torch.no_grad():
        maps = gradcam_maps(model, torch.as_tensor(images), [0, 0])
    np.testing.assert_allclose(maps, gradcam_maps(model, images, [0, 0]), atol=1e-6)  # the maps it makes anyway
    assert all(m.std() > 0 for m in maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_maps_on_the_gpu_equal_the_cpu_ones(model: torch.nn.Module) -> None:
    images = _images(2, 64)
    on_gpu = gradcam_maps(model, images, [0, 1], device="cuda")
    model.to("cpu")
    np.testing.assert_allclose(on_gpu, gradcam_maps(model, images, [0, 1], device="cpu"), atol=1e-3)
    assert _hook_count(model) == 0


def test_overlay_and_saved_overlay(tmp_path: Path) -> None:
    image = np.zeros((3, 32, 32), dtype=np.uint8)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:, 16:] = 1.0
    blended = overlay(image, heat)
    assert blended.shape == (32, 32, 3) and blended.dtype == np.uint8
    # jet: 0 is dark blue, 1 dark red; the hot half (the right, columns 16+) is red, not blue.
    assert blended[:, 20:, 0].mean() > blended[:, 20:, 2].mean()
    assert blended[:, :12, 2].mean() > blended[:, :12, 0].mean()
    save_overlay(image, heat, tmp_path / "a" / "x.png")
    with Image.open(tmp_path / "a" / "x.png") as saved:
        assert saved.size == (224, 224) and saved.format == "PNG"
        right = np.asarray(saved)[:, 150:]
        assert right[..., 0].mean() > right[..., 2].mean()  # enlarged, not flipped


def test_choose_examples_mixes_correct_and_misclassified() -> None:
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    probs = np.array([[0.9, 0.1, 0], [0.6, 0.4, 0], [0.2, 0.8, 0], [0.1, 0.2, 0.7], [0.7, 0.3, 0],
                      [0.1, 0.9, 0], [0.2, 0.7, 0.1], [0.5, 0.5, 0]])
    chosen = choose_examples(labels, probs, per_class=4)
    assert chosen[0] == [0, 4, 2, 3]   # best two correct, then the two mistakes, most confident first
    assert chosen[1] == [5, 6]         # no mistakes: all correct ones
    assert chosen[2] == [7]            # only a mistake
    assert choose_examples(labels, probs, per_class=3)[0] == [0, 4, 2]  # odd: the extra place is a correct one


def test_galleries_per_class(model: torch.nn.Module, tmp_path: Path) -> None:
    images = _images(6, 64)
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.full((6, 3), 0.2)
    probs[np.arange(6), [0, 1, 1, 2, 1, 0]] = 0.6
    ids = [f"dir/img{i}" for i in range(6)]
    ev = Explainable(images, labels, probs, ids, ("mel", "nv", "bcc"))
    galleries = write_galleries(model, ev, tmp_path, options=GradcamOptions(per_class=2))
    assert galleries == {"mel": "gradcam_mel.png", "nv": "gradcam_nv.png"}  # bcc has no image
    for name in galleries.values():
        with Image.open(tmp_path / name) as figure:
            figure.load()
    assert sorted(p.name for p in (tmp_path / "gradcam" / "nv").iterdir()) == \
        ["dir_img2_pred-nv.png", "dir_img3_pred-bcc.png"]
    assert len(list((tmp_path / "gradcam" / "mel").iterdir())) == 2
    assert _hook_count(model) == 0
    # A second run replaces the galleries; with no examples wanted, none is left behind.
    assert write_galleries(model, ev, tmp_path, options=GradcamOptions(per_class=0)) == {}
    assert not list(tmp_path.glob("gradcam*"))


def test_map_side_matches_the_network_and_coarse_maps_are_flagged(model: torch.nn.Module) -> None:
    for size in (32, 48, 64, 100, 128, 224):
        with torch.no_grad():
            features = torch.nn.Sequential(*list(model.children())[:-2])(torch.zeros(1, 3, size, size))
        assert features.shape[-1] == map_side(size), size
    assert "2x2" in coarse_map_note(48) and coarse_map_note(128) is None
    assert coarse_map_note(64, "layer2") is None and "layer3" in coarse_map_note(48, "layer3")


def test_layer_is_chosen_by_image_size(model: torch.nn.Module) -> None:
    expected = {16: "layer2", 32: "layer2", 64: "layer2", 111: "layer2", 112: "layer3", 128: "layer3",
                223: "layer3", 224: "layer4", 448: "layer4"}
    assert {size: choose_layer(size, "gradcam") for size in expected} == expected
    assert {choose_layer(size, "guided") for size in expected} == {"layer4"}  # its resolution is per pixel
    for size in (64, 112, 224):
        stages = dict(model.named_children())
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
                x = stages[name](x)
                if name == choose_layer(size, "gradcam"):
                    assert x.shape[-1] == stage_side(size, name) >= 7
    # plain Grad-CAM's default map is the chosen stage's: at 64 px layer2, an 8x8 map, finer than layer4's 2x2
    images = _images(2, 64, seed=3)
    np.testing.assert_allclose(gradcam_maps(model, images, [0, 1], method="gradcam"),
                               gradcam_maps(model, images, [0, 1], layer="layer2", method="gradcam"))
    np.testing.assert_allclose(gradcam_maps(model, images, [0, 1]),  # the default method: guided, on layer4
                               gradcam_maps(model, images, [0, 1], layer="layer4", method="guided"))


def test_mask_outline_is_drawn_on_overlays(tmp_path: Path) -> None:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 5:11] = 1
    edge = outline(mask)
    assert edge.sum() == 2 * (8 + 6) - 4 and edge[4, 5] and edge[11, 10] and not edge[6, 7] and not edge[0, 0]
    image = np.zeros((3, 16, 16), dtype=np.uint8)
    heat = np.zeros((16, 16), dtype=np.float32)
    drawn = overlay(image, heat, mask=mask)
    assert (drawn[edge] == OUTLINE_COLOR).all() and not (drawn[~edge] == OUTLINE_COLOR).all(-1).any()
    save_overlay(image, heat, tmp_path / "o.png", mask=mask)
    with Image.open(tmp_path / "o.png") as saved:
        pixels = np.asarray(saved)
    white = (pixels == OUTLINE_COLOR).all(-1)
    assert pixels.shape[:2] == (224, 224) and white[4 * 14, 5 * 14:11 * 14].all()  # a thin line, enlarged
    assert white.sum() < 2 * (8 + 6) * 14 + 8 and not white[6 * 14 + 7, 7 * 14]


def test_explain_evaluation_scores_masked_images_and_draws_galleries(model: torch.nn.Module, tmp_path: Path) -> None:
    images = _images(8, 64, seed=4)
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    probs = np.random.default_rng(0).dirichlet(np.ones(3), 8)
    masks = np.zeros((8, 64, 64), dtype=np.uint8)
    masks[:, 16:48, 16:48] = 1
    has_mask = np.array([True] * 6 + [False] * 2)
    ids, names = [f"i{k}" for k in range(8)], ("mel", "nv", "bcc")
    masked = Explainable(images, labels, probs, ids, names, masks=masks, has_mask=has_mask)
    explained = explain_evaluation(model, masked, tmp_path, options=GradcamOptions(per_class=1, method="gradcam"))
    doc = explained.document
    assert doc["layer"] == "layer2" and doc["map_side"] == 8 and doc["layer_chosen_by"] == "image size"
    assert doc["method"] == "LayerGradCam" and explained.notes == ()
    lesions = doc["lesion_masks"]
    assert lesions["n_images"] == 6 and set(lesions["per_class"]) == {"mel", "nv", "bcc"}
    assert lesions["overall"]["uniform"]["energy_inside"] == 0.25
    assert doc["correlation_over"] == "images with a lesion mask" and isinstance(doc["bias_alarm"], bool)
    assert set(explained.galleries) == {"mel", "nv", "bcc"} and len(list((tmp_path / "gradcam").rglob("*.png"))) == 3
    none = explain_evaluation(model, Explainable(images, labels, probs, ids, names), tmp_path,
                              options=GradcamOptions(per_class=2, layer="layer3"))
    assert none.document["lesion_masks"] is None and none.document["layer_chosen_by"] == "--gradcam-layer"
    assert none.document["method"] == "GuidedGradCam"  # the default
    assert none.document["correlation_over"] == "gallery images"
    off = explain_evaluation(model, masked, tmp_path, options=GradcamOptions(per_class=0))
    assert off.document is None and off.galleries == {} and not list(tmp_path.glob("gradcam*"))


def test_guided_maps_match_captum_and_release_their_hooks(model: torch.nn.Module, monkeypatch) -> None:
    from captum.attr import GuidedGradCam

    import core.explain.gradcam
    from core.model.forward import normalize

    monkeypatch.setattr(core.explain.gradcam, "BATCH_SIZE", 2)
    images = _images(3, 64, seed=5)
    ours = gradcam_maps(model, images, [0, 1, 2], layer="layer3", method="guided")
    assert ours.shape == (3, 64, 64) and _hook_count(model) == 0 and all(p.grad is None for p in model.parameters())
    x = normalize(torch.as_tensor(images)).requires_grad_()
    with pytest.warns(UserWarning, match="backward hooks on ReLU"):  # ours keeps this notice quiet
        raw = GuidedGradCam(model, model.layer3).attribute(x, target=torch.tensor([0, 1, 2]))
    heat = raw.detach().abs().sum(1).numpy()
    np.testing.assert_allclose(ours, heat / heat.reshape(3, -1).max(1)[:, None, None], atol=1e-5)
    assert (ours > 0).mean() > 0.05 and len(np.unique(ours)) > 100  # pixel-level, not a coarse grid
