"""Every backbone of config key ``arch``: builds, trains two steps, round-trips through its model file, and
Grad-CAM finds its layer (tiny images, no pretrained weights)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ARCHS, TrainConfig
from core.data import SplitOptions, load_dataset
from core.demo_data import generate_demo
from core.errors import UserError
from core.gradcam import choose_layer, gradcam_maps
from core.inference import load_for_inference
from core.model import build_model, gradcam_layer, load_model_file, save_model_file
from core.train import RunOptions, train

SIZE = 32  # ConvNeXt's three stride-2 downsamplings after its stride-4 stem need at least 32 px
QUIET = RunOptions(progress=False, tensorboard=False)
EXPECTED_LAYER = {"resnet18": "layer4", "resnet34": "layer4", "resnet50": "layer4",
                  "efficientnet_b0": "features[-1]", "convnext_tiny": "features[-1]",
                  "mobilenet_v3_large": "features[-1]", "regnet_y_800mf": "trunk_output"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = generate_demo(tmp_path_factory.mktemp("archs") / "data", n_lesions=24, image_size=SIZE, seed=3)
    return load_dataset(root, SIZE, SplitOptions(0.2, 0.2), progress=False, masks=False)


def test_the_listed_archs_are_the_expected_set() -> None:
    assert set(ARCHS) == set(EXPECTED_LAYER) and ARCHS[0] == "resnet18" and TrainConfig().arch == "resnet18"


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_two_steps_round_trips_and_explains(arch: str, tiny, tmp_path: Path) -> None:
    n_train = len(tiny.indices("train"))
    cfg = TrainConfig(arch=arch, image_size=SIZE, epochs=1, batch_size=n_train // 2, pretrained="none",
                      warmup_epochs=0.0, eval_batch_size=64, lr=1e-3)
    result = train(cfg, tiny, tmp_path, options=QUIET)
    assert result.epochs_run == 1 and np.isfinite(result.last_metrics["train_loss"])
    assert result.last_metrics["train_images_per_s"] > 0
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    assert raw["arch"] == arch and raw["metadata"] is None
    loaded = load_for_inference(tmp_path / "best.pt", "cpu")
    assert loaded.arch == arch and loaded.metadata_spec is None
    val = tiny.indices("val")
    probs = loaded.predict(tiny.images[val], calibrated=False)
    assert probs.shape == (len(val), len(tiny.class_names))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert abs(probs.argmax(1) == tiny.labels[val]).mean() == pytest.approx(result.last_metrics["val_accuracy"])
    assert choose_layer(SIZE, "gradcam", arch) in (EXPECTED_LAYER[arch], "layer2", "layer3")
    assert gradcam_layer(loaded.model) is not None
    for method in ("gradcam", "guided"):
        maps = gradcam_maps(loaded.model, tiny.images[val[:2]], [0, 1], layer=None, method=method)
        assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all() and maps.max() <= 1.0


def test_a_layer_the_arch_lacks_is_a_clear_error() -> None:
    model = build_model(3, "none", "convnext_tiny")
    assert gradcam_layer(model) is model.features[-1]
    with pytest.raises(UserError, match=r"has no such layer; its Grad-CAM layer is features\[-1\]"):
        gradcam_layer(model, "layer3")
    resnet = build_model(3, "none", "resnet34")
    assert gradcam_layer(resnet, "layer3") is resnet.layer3  # the resnets keep their stage option


def test_unknown_arch_is_a_one_line_error() -> None:
    with pytest.raises(UserError, match=r"config key 'arch' = 'vgg16': must be one of") as err:
        TrainConfig(arch="vgg16")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown arch 'vgg16'"):
        build_model(3, "none", "vgg16")


def test_missing_imagenet_weights_name_the_file_and_the_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torch.hub.download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError) as err:
        build_model(7, "imagenet", "efficientnet_b0")
    text = str(err.value)
    assert "EfficientNet-B0" in text and "efficientnet_b0_rwightman-7f5810bc.pth" in text
    assert str(tmp_path / "hub" / "checkpoints") in text and "pretrained=none" in text


def test_imagenet_weights_of_another_arch_come_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    from torchvision.models import get_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(4)
    state = get_model("regnet_y_800mf", weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "regnet_y_800mf-1b27b58c.pth")
    model = build_model(5, "imagenet", "regnet_y_800mf")
    torch.testing.assert_close(model.stem[0].weight, state["stem.0.weight"])
    assert model.fc.out_features == 5


def test_a_file_without_arch_is_a_resnet18_and_an_unknown_arch_is_refused(tmp_path: Path) -> None:
    model = build_model(3, "none")
    path = tmp_path / "m.pt"
    save_model_file(path, model, ("a", "b", "c"), TrainConfig(image_size=SIZE).to_dict())
    payload = torch.load(path, weights_only=True)
    del payload["arch"], payload["metadata"]
    torch.save(payload, path)
    loaded, meta = load_model_file(path)
    assert meta["arch"] == "resnet18" and meta["metadata"] is None
    payload["arch"] = "alexnet"
    torch.save(payload, path)
    with pytest.raises(UserError, match="arch 'alexnet'"):
        load_model_file(path)
