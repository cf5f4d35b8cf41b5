import dataclasses

import torch

from core.augment import augment_batch, normalize
from core.config import TrainConfig

OFF = dict(hflip=False, vflip=False, rot90=False, rotation_degrees=0.0, crop_scale_min=1.0, color_jitter=0.0)


def _images(b=8, s=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shapes_dtype_and_all_off_is_normalize():
    x = _images()
    cfg = TrainConfig(**OFF)
    out = augment_batch(x, cfg, _gen())
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, normalize(x))


def test_full_augmentation_differs_per_sample_and_is_seeded():
    one = _images(1).expand(16, -1, -1, -1).contiguous()  # the same image 16 times
    cfg = TrainConfig(rotation_degrees=20.0, crop_scale_min=0.5, color_jitter=0.3)
    out = augment_batch(one, cfg, _gen(3))
    assert out.shape == one.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    flat = out.flatten(1)
    distinct = {tuple(row[:50].round(decimals=4).tolist()) for row in flat}
    assert len(distinct) == 16, "every sample should get its own random parameters"
    torch.testing.assert_close(augment_batch(one, cfg, _gen(3)), out)
    assert not torch.allclose(augment_batch(one, cfg, _gen(4)), out)


def test_flips_and_quarter_turns_are_exact():
    x = _images(32)
    cfg = TrainConfig(**{**OFF, "hflip": True, "vflip": True, "rot90": True})
    out = augment_batch(x, cfg, _gen())
    ref = normalize(x)
    for i in range(len(x)):
        variants = [torch.rot90(ref[i], k, dims=(1, 2)) for k in range(4)]
        variants += [v.flip(2) for v in variants]
        assert min((out[i] - v).abs().max().item() for v in variants) < 1e-4
    assert (out - ref).abs().flatten(1).max(1).values.gt(1e-3).sum() > 8  # most samples changed


def test_each_component_can_be_switched_on_alone():
    x = _images(4)
    for key, value in [("hflip", True), ("rotation_degrees", 30.0), ("crop_scale_min", 0.3), ("color_jitter", 0.5)]:
        cfg = dataclasses.replace(TrainConfig(**OFF), **{key: value})
        out = augment_batch(x, cfg, _gen(7))
        assert out.shape == x.shape and torch.isfinite(out).all(), key


def test_color_jitter_keeps_range():
    x = _images(8)
    out = augment_batch(x, TrainConfig(**{**OFF, "color_jitter": 1.0}), _gen())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x01 = out * std + mean
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
