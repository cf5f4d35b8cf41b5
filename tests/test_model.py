from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from core.config import TrainConfig
from core.errors import UserError
from core.model.networks import build_model, gradcam_layer, load_model_file, save_model_file


def _reference_state(seed=0):
    torch.manual_seed(seed)
    return resnet18(weights=None).state_dict()


def test_pretrained_state_dict_file_is_loaded(tmp_path):
    state = _reference_state(1)
    path = tmp_path / "backbone.pt"
    torch.save(state, path)
    model = build_model(5, str(path))
    assert model.fc.out_features == 5
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(model.layer4[1].bn2.running_mean, state["layer4.1.bn2.running_mean"])


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _reference_state(2)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "resnet18-f37072fd.pth")
    model = build_model(7, "imagenet")
    torch.testing.assert_close(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert model.fc.out_features == 7


def test_imagenet_weights_absent_fail_with_a_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # No network here; where there is one, pretend the download fails all the same.
    monkeypatch.setattr("torch.hub.download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError, match="pretrained=none") as err:
        build_model(7, "imagenet")
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_bad_pretrained_files(tmp_path, content):
    path = tmp_path / "weights.pt"
    if content is None:
        torch.save({"conv1.weight": torch.zeros(1)}, path)  # a state_dict, but not a ResNet-18
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match="weights.pt"):
        build_model(3, str(path))
    with pytest.raises(UserError, match="no such weights file"):
        build_model(3, str(tmp_path / "absent.pt"))


def test_model_file_round_trip(tmp_path):
    model = build_model(3, "none")
    cfg = TrainConfig(image_size=32, pretrained="none")
    path = tmp_path / "model.pt"
    save_model_file(path, model, ("a", "b", "c"), cfg.to_dict(), {"epoch": 2, "metrics": {"val_accuracy": 0.5}})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "lesion-sweep/model" and raw["class_names"] == ["a", "b", "c"]
    loaded, header = load_model_file(path)
    assert not loaded.training and header["epoch"] == 2 and header["image_size"] == 32
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)
    assert gradcam_layer(loaded) is loaded.layer4


def test_not_a_model_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="other.pt: not a lesion-sweep model file"):
        load_model_file(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello")
    with pytest.raises(UserError, match="garbage.pt"):
        load_model_file(garbage)
