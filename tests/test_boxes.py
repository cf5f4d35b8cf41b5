"""Lesion boxes: targets that follow every augmentation, the box head's training and model file, the Grad-CAM box,
the localisation scores on hand-made boxes, and core.predict's answer. Tiny generated data only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.training.augment import Mix, augment_batch
from core.model.forward import normalize
from core.model.box_head import box_head_of, capture_boxes, view_boxes
from core.training.box_targets import batch_box_loss, mix_with_masks
from core.explain.cam_boxes import cam_boxes, choose_fraction, max_box_acc
from core.config import TrainConfig
from core.data.lesion_boxes import box_answer, mask_boxes
from core.evaluation.localisation import box_scores, localisation_section

S = 32
OFF = dict(hflip=False, vflip=False, rot90=False, rotation_degrees=0.0, crop_scale_min=1.0, translate=0.0,
           color_jitter=0.0)


def square_batch(n: int = 16, top: int = 4, left: int = 6, side: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """n images with a white square lesion on black at (top, left), and its mask."""
    masks = torch.zeros(n, S, S, dtype=torch.uint8)
    masks[:, top:top + side, left:left + side] = 1
    return (masks[:, None].expand(n, 3, S, S) * 255).contiguous(), masks


def lesion_in_image(x: torch.Tensor) -> torch.Tensor:
    """Where the augmented (normalised) images are brighter than half: the drawn lesion, moved."""
    half = normalize(torch.full((1, 3, 1, 1), 127.5))
    return x[:, 0] > half[0, 0]


@pytest.mark.parametrize("change", [dict(hflip=True), dict(vflip=True), dict(rot90=True)])
def test_flips_and_quarter_turns_give_the_turned_box(change: dict) -> None:
    images, masks = square_batch()
    cfg = TrainConfig(**{**OFF, **change})
    g = torch.Generator().manual_seed(0)
    x, moved = augment_batch(images, cfg, g, masks)
    boxes = mask_boxes(moved)[0].numpy()
    x0, y0, x1, y1 = 6 / S, 4 / S, 16 / S, 14 / S
    mirrored_x, mirrored_y = (1 - x1, y0, 1 - x0, y1), (x0, 1 - y1, x1, 1 - y0)
    quarter = [(x0, y0, x1, y1), (y0, 1 - x1, y1, 1 - x0), (1 - x1, 1 - y1, 1 - x0, 1 - y0), (1 - y1, x0, 1 - y0, x1)]
    allowed = {"hflip": [(x0, y0, x1, y1), mirrored_x], "vflip": [(x0, y0, x1, y1), mirrored_y], "rot90": quarter}
    expected = allowed[next(iter(change))]
    for box in boxes:  # each sample drew its own flip or turn: its box is one of the turned boxes, exactly
        assert min(np.abs(box - np.array(e)).max() for e in expected) < 1e-6, box
    assert len({tuple(np.round(b, 4)) for b in boxes}) > 1   # both (or several) outcomes were drawn
    assert torch.equal(mask_boxes(lesion_in_image(x))[0], mask_boxes(moved)[0])


@pytest.mark.parametrize("change", [dict(rotation_degrees=40.0), dict(crop_scale_min=0.3), dict(translate=0.3),
                                    dict(rot90=True, hflip=True, rotation_degrees=20.0, crop_scale_min=0.5,
                                         translate=0.1)])
def test_rotation_crop_and_translation_move_the_target_with_the_image(change: dict) -> None:
    images, masks = square_batch()
    g = torch.Generator().manual_seed(1)
    x, moved = augment_batch(images, TrainConfig(**{**OFF, **change}), g, masks)
    original = mask_boxes(masks)[0]
    target, nonempty = mask_boxes(moved)
    assert nonempty.any() and not torch.allclose(target[nonempty], original[nonempty])  # it did move
    # the box of the lesion as drawn in the augmented image is the target
    assert torch.equal(mask_boxes(lesion_in_image(x))[0], target)
    # and the masks leave the images' random draws as they were
    same = augment_batch(images, TrainConfig(**{**OFF, **change}), torch.Generator().manual_seed(1))
    assert torch.equal(same, x)


def test_cutmix_and_mixup_targets() -> None:
    images, masks = square_batch(2)
    images[1], masks[1] = 0, 0
    masks[1, 20:30, 20:30] = 1
    images[1, :, 20:30, 20:30] = 255
    x = normalize(images)
    rng = np.random.default_rng(3)
    perm = torch.tensor([1, 0])
    mixed, mixed_masks, mix = mix_with_masks(x, masks.float(), Mix("cutmix", perm, 0.5), rng)
    assert torch.equal(mask_boxes(lesion_in_image(mixed))[0], mask_boxes(mixed_masks)[0])  # the box of what shows
    _, mixed_masks, _ = mix_with_masks(x, masks.float(), Mix("mixup", perm, 0.7), rng)
    assert torch.equal(mask_boxes(mixed_masks)[0], mask_boxes(masks)[0])   # the image that weighs more
    # an image without a mask, or whose partner has none, adds no loss
    predicted = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.2, 0.2]])
    assert batch_box_loss(predicted, masks.float(), torch.tensor([False, False]), None) == 0
    assert batch_box_loss(predicted, masks.float(), torch.tensor([True, False]), mix) == 0
    assert batch_box_loss(predicted, masks.float(), torch.tensor([True, False]), None) > 0


@pytest.fixture(scope="module")
def trained(module_tmp: Path) -> dict:
    """One epoch with the box head on tiny demo data (with masks), mixup and CutMix on."""
    from core.data.dataset import SplitOptions, load_dataset
    from core.data.demo_data import generate_demo
    from core.train import RunOptions, train

    root = generate_demo(module_tmp / "data", n_lesions=21, image_size=S, seed=2)
    cfg = TrainConfig(image_size=S, epochs=1, batch_size=16, pretrained="none", device="cpu", box_loss_weight=1.0,
                      mixup_prob=0.3, cutmix_prob=0.5, rotation_degrees=10.0)
    data = load_dataset(root, S, SplitOptions(0.2, 0.2, 0), progress=False)
    result = train(cfg, data, module_tmp / "run", options=RunOptions(progress=False, tensorboard=False))
    return {"root": root, "data": data, "run": module_tmp / "run", "result": result, "cfg": cfg}


def test_the_head_trains_and_its_model_file_round_trips(trained: dict) -> None:
    from core.model.networks import build_model, load_model_file

    assert trained["result"].history[0]["train_box_loss"] > 0
    model, _ = load_model_file(trained["run"] / "best.pt")
    head = box_head_of(model)
    assert head is not None
    untrained = build_model(7, "none", box_head=True)
    assert not torch.equal(box_head_of(untrained).linear.weight, head.linear.weight)
    images = torch.as_tensor(trained["data"].images[:5])
    with capture_boxes(model) as got:
        logits = model(normalize(images))
    assert logits.shape == (5, 7) and got[0].shape == (5, 4)      # model(x) is still the logits
    boxes = got[0]
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    again, _ = load_model_file(trained["run"] / "best.pt")
    with capture_boxes(again) as got_again:
        again(normalize(images))
    assert torch.allclose(got_again[0], boxes)
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())   # the hook is gone
    # a model file with a head is a backbone for another run, its head made anew
    fresh = build_model(7, str(trained["run"] / "best.pt"))
    assert box_head_of(fresh) is None


def test_a_model_with_clinical_fields_and_every_arch_family_have_the_head() -> None:
    from core.model.fields import make_spec
    from core.model.networks import build_model

    x = torch.zeros(2, 3, S, S)
    for arch, fusion in (("resnet18", "film"), ("mobilenet_v3_large", None), ("convnext_tiny", None)):
        model = build_model(3, "none", arch, make_spec(fusion) if fusion else None, box_head=True).eval()
        with capture_boxes(model) as got:
            assert model(x).shape == (2, 3)
        assert got[0].shape == (2, 4)


def test_tta_keeps_the_plain_views_boxes() -> None:
    from core.model.networks import build_model
    from core.model.tta import DihedralMean

    model = build_model(3, "none", box_head=True).eval()
    x = torch.rand(3, 3, S, S)
    with torch.no_grad(), capture_boxes(model) as plain:
        model(x)
    with torch.no_grad(), capture_boxes(model) as views:
        DihedralMean(model)(x)
    assert np.allclose(view_boxes(views, tta=True), view_boxes(plain), atol=1e-5)


def test_scores_on_hand_made_boxes() -> None:
    truth = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    predicted = np.array([[0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5], [0, 0, 0.5, 0.5]])
    scores = box_scores(predicted, truth)
    assert scores["mean_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert scores["iou_0.3"] == pytest.approx(2 / 3) and scores["iou_0.5"] == pytest.approx(1 / 3)
    assert box_answer([0.25, 0.5, 0.75, 1.0], 200, 150, "box head")["pixels"] == [50.0, 75.0, 150.0, 150.0]


def test_the_grad_cam_box_is_the_largest_region_above_the_fraction() -> None:
    heat = np.zeros((1, 20, 20), np.float32)
    heat[0, 2:4, 2:4] = 1.0          # a small hot spot
    heat[0, 10:18, 5:15] = 0.6       # a large warm region
    assert np.allclose(cam_boxes(heat, 0.5)[0], [5 / 20, 10 / 20, 15 / 20, 18 / 20])
    assert np.allclose(cam_boxes(heat, 0.9)[0], [2 / 20, 2 / 20, 4 / 20, 4 / 20])
    assert np.allclose(cam_boxes(np.zeros((1, 20, 20)), 0.5)[0], [0, 0, 1, 1])   # a flat map points nowhere
    truth = np.array([[5 / 20, 10 / 20, 15 / 20, 18 / 20]])
    assert choose_fraction(heat, truth, (0.5, 0.9))["fraction"] == 0.5
    assert max_box_acc(heat, truth)["max_box_acc"] == 1.0


def test_the_localisation_section_scores_every_box_against_the_masks() -> None:
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, 0:5, 0:5] = 1
    masks[1, 5:10, 5:10] = 1
    head = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    section = localisation_section(masks, head, masks.astype(np.float32), {"centre_prior": [0.25, 0.25, 0.75, 0.75],
                                                                          "cam_fraction": 0.5})
    boxes = section["boxes"]
    assert boxes["head"]["mean_iou"] == 1.0 and boxes["gradcam"]["mean_iou"] == 1.0
    assert boxes["whole_image"]["mean_iou"] == pytest.approx(0.25)
    assert boxes["centre_prior"]["mean_iou"] == pytest.approx(1 / 7)
    assert section["max_box_acc"]["max_box_acc"] == 1.0


def test_predict_json_answers_the_box_in_pixels_of_the_file(trained: dict, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from core.predict import main

    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8)).save(image)
    assert main([str(trained["run"] / "best.pt"), str(image), "--json", "--gradcam", str(tmp_path / "cam")]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    box, cam = row["box"], row["gradcam"]["box"]
    assert box["source"] == "box head" and cam["source"] == "Grad-CAM" and box["image_size"] == [60, 30]
    x0, y0, x1, y1 = box["fractions"]
    assert box["pixels"] == pytest.approx([x0 * 60, y0 * 30, x1 * 60, y1 * 30], abs=0.06)


def test_evaluate_scores_the_heads_box_from_the_prediction_pass(trained: dict, tmp_path: Path) -> None:
    from core.evaluate import main

    assert main([str(trained["run"] / "best.pt"), "--data", str(trained["root"]), "--out", str(tmp_path),
                 "--gallery", "1", "--bootstrap", "0"]) == 0
    section = json.loads((tmp_path / "metrics.json").read_text())["localisation"]
    assert {"head", "gradcam", "whole_image"} <= set(section["boxes"])   # best.pt stores no centre prior
    assert section["boxes"]["gradcam"]["fraction_chosen_on"].startswith("default")
    assert 0 <= section["boxes"]["head"]["mean_iou"] <= 1 and (tmp_path / "boxes.png").is_file()
    assert "| box head |" in (tmp_path / "report.md").read_text()
    # with TTA the head's boxes are still those of the images as given (the single view's pass)
    assert main([str(trained["run"] / "best.pt"), "--data", str(trained["root"]), "--out", str(tmp_path / "tta"),
                 "--gallery", "0", "--bootstrap", "0", "--tta"]) == 0
    with_tta = json.loads((tmp_path / "tta" / "metrics.json").read_text())["localisation"]
    assert with_tta["boxes"]["head"] == section["boxes"]["head"] and "gradcam" not in with_tta["boxes"]
