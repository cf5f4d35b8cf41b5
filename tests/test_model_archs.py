"""Every backbone of config key ``arch``: builds, trains two steps, round-trips through its model file, and
Grad-CAM finds its layer (tiny images, no pretrained weights)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ARCHS, TrainConfig
from core.data.dataset import SplitOptions, load_dataset
from core.data.demo_data import generate_demo
from core.errors import UserError
from core.explain.gradcam import choose_layer, gradcam_maps
from core.model.inference import predict_probs
from core.model.loading import load_for_inference
from core.model.networks import build_model, gradcam_layer, load_model_file, save_model_file


SIZE = 32  # ConvNeXt's three stride-2 downsamplings after its stride-4 stem need at least 32 px
EXPECTED_LAYER = {"resnet18": "layer4", "resnet34": "layer4", "resnet50": "layer4",
                  "efficientnet_b0": "features[-1]", "convnext_tiny": "features[-1]",
                  "mobilenet_v3_large": "features[-1]", "regnet_y_800mf": "trunk_output"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = generate_demo(tmp_path_factory.mktemp("archs") / "data", n_lesions=24, image_size=SIZE, seed=3)
    return load_dataset(root, SIZE, SplitOptions(0.2, 0.2), progress=False, masks=False)


def test_the_listed_archs_are_the_expected_set() -> None:
    assert set(ARCHS) == set(EXPECTED_LAYER) and ARCHS[0] == "resnet18" and TrainConfig().arch == "resnet18"


def _two_steps(model: torch.nn.Module, data, cfg: TrainConfig) -> dict[str, float]:
    """Two training steps of core/training/loop.py's epoch (augmentation, loss, optimiser, schedule) on the CPU."""
    from core.device import Placement
    from core.training.loop import Batches, Optimisation, train_one_epoch
    from core.training.optim import make_criterion, make_optimizer, make_scheduler

    train_idx = torch.as_tensor(data.indices("train"))
    batches = Batches(images=torch.as_tensor(data.images), labels=torch.as_tensor(data.labels), train_idx=train_idx,
                      batch_size=len(train_idx) // 2, steps_per_epoch=2, placement=Placement.of(torch.device("cpu"), "fp32"))
    optimizer = make_optimizer(model, cfg)
    opt = Optimisation(model, optimizer, make_scheduler(optimizer, cfg, 2),
                       make_criterion(cfg, data.class_counts("train"), torch.device("cpu")))
    return train_one_epoch(opt, batches, torch.randperm(len(train_idx)), cfg, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_two_steps_round_trips_and_explains(arch: str, tiny, tmp_path: Path) -> None:
    cfg = TrainConfig(arch=arch, image_size=SIZE, epochs=1, pretrained="none", warmup_epochs=0.0, lr=1e-3)
    torch.manual_seed(0)
    model = build_model(len(tiny.class_names), "none", arch)
    before = [p.detach().clone() for p in model.parameters()]
    stats = _two_steps(model, tiny, cfg)
    assert np.isfinite(stats["train_loss"]) and stats["train_images_per_s"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # the steps changed weights
    save_model_file(tmp_path / "model.pt", model, tiny.class_names, cfg.to_dict(), {"epoch": 1})
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["arch"] == arch and raw["metadata"] is None
    loaded = load_for_inference(tmp_path / "model.pt", "cpu")
    assert loaded.arch == arch and loaded.fusion is None
    val = tiny.indices("val")
    probs = loaded.predict(tiny.images[val], calibrated=False)
    np.testing.assert_allclose(probs, predict_probs(model.eval(), tiny.images[val]), atol=1e-6)  # same weights
    assert choose_layer(SIZE, "gradcam", arch) in (EXPECTED_LAYER[arch], "layer2", "layer3")
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
    loaded, header = load_model_file(path)
    assert header["arch"] == "resnet18" and header["metadata"] is None
    payload["arch"] = "alexnet"
    torch.save(payload, path)
    with pytest.raises(UserError, match="arch 'alexnet'"):
        load_model_file(path)


def test_predict_takes_the_layer_of_its_models_arch_and_names_the_others(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from core.errors import run_cli
    from core.predict import main

    cfg = TrainConfig(arch="mobilenet_v3_large", image_size=SIZE, pretrained="none")
    save_model_file(tmp_path / "model.pt", build_model(3, "none", cfg.arch).eval(), ("a", "b", "c"), cfg.to_dict(),
                    {"epoch": 1})
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    args = [str(tmp_path / "model.pt"), str(tmp_path / "x.png"), "--gradcam", str(tmp_path / "maps")]
    with pytest.raises(SystemExit) as bad:
        run_cli(main, [*args, "--gradcam-layer", "layer3"])
    err = capsys.readouterr().err.strip()
    assert bad.value.code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("error: Grad-CAM layer 'layer3'") and "its Grad-CAM layer is features[-1]" in err
    assert not (tmp_path / "maps").exists() or not list((tmp_path / "maps").iterdir())  # failed before any work
    assert main([*args, "--gradcam-layer", "features[-1]"]) == 0
    assert (tmp_path / "maps" / "x_gradcam.png").is_file()
