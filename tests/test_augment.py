import math

import torch

from core.training.augment import augment_batch
from core.model.forward import normalize
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


def _unnormalize(out):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (out * std + mean) * 255


def test_flips_alone_mirror_and_nothing_else():
    x = _images(32)
    ref = normalize(x)
    for key, dim in (("hflip", 3), ("vflip", 2)):
        out = augment_batch(x, TrainConfig(**{**OFF, key: True}), _gen(5))
        same = [(out[i] - ref[i]).abs().max() < 1e-4 for i in range(len(x))]
        mirrored = [(out[i] - ref[i].flip(dim - 1)).abs().max() < 1e-4 for i in range(len(x))]
        assert all(a or b for a, b in zip(same, mirrored)), key
        assert 4 < sum(mirrored) < 28, key  # about half the samples


def _spot_image(b: int, s: int = 64) -> torch.Tensor:
    """A dark image with one bright 6x6 square centred at (row 19.5, col 43.5): 12 px right of and 12 px above the centre."""
    x = torch.zeros(b, 3, s, s, dtype=torch.uint8)
    x[:, :, 17:23, 41:47] = 255
    return x


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    weight = img.float().mean(0).clamp(min=0)
    weight = torch.where(weight > 60, weight, torch.zeros_like(weight))
    rows, cols = torch.meshgrid(torch.arange(weight.shape[0]), torch.arange(weight.shape[1]), indexing="ij")
    total = weight.sum()
    return float((weight * rows).sum() / total), float((weight * cols).sum() / total)


def test_rotation_turns_about_the_centre_by_at_most_the_angle():
    x = _spot_image(32)
    out = _unnormalize(augment_batch(x, TrainConfig(**{**OFF, "rotation_degrees": 30.0}), _gen(2)))
    centre, start = 31.5, (19.5, 43.5)

    def polar(r: float, c: float) -> tuple[float, float]:
        return math.hypot(r - centre, c - centre), math.degrees(math.atan2(centre - r, c - centre))

    turned = []
    for img in out:
        radius, angle = polar(*_centroid(img))
        assert abs(radius - polar(*start)[0]) < 1.5
        angle -= polar(*start)[1]
        assert abs(angle) <= 30.5
        turned.append(abs(angle))
    assert max(turned) > 15  # the range is used, not just a sliver of it


def test_random_resized_crop_zooms_in_by_the_area_asked_for():
    s = 64
    ramp = torch.arange(s).float() * 3  # intensity grows 3 per pixel
    x = torch.stack([ramp.view(1, s).expand(s, s), ramp.view(s, 1).expand(s, s), torch.zeros(s, s)])
    x = x.to(torch.uint8).expand(64, -1, -1, -1).contiguous()
    out = _unnormalize(augment_batch(x, TrainConfig(**{**OFF, "crop_scale_min": 0.4}), _gen(1)))
    inner = slice(8, -8)
    gx = (out[:, 0, inner, 1:] - out[:, 0, inner, :-1]).median(dim=-1).values.median(dim=-1).values / 3
    gy = (out[:, 1, 1:, inner] - out[:, 1, :-1, inner]).median(dim=-2).values.median(dim=-1).values / 3
    area = gx * gy  # the crop's share of the image's width times that of its height
    assert (gx <= 1.02).all() and (gy <= 1.02).all()
    assert (area >= 0.4 - 0.03).all() and (area <= 1.03).all()
    assert (area < 0.7).sum() > 10  # small crops do happen


def test_color_jitter_scales_grey_brightness_within_the_range_and_keeps_it_grey():
    grey = torch.full((32, 3, 16, 16), 128, dtype=torch.uint8)
    out = _unnormalize(augment_batch(grey, TrainConfig(**{**OFF, "color_jitter": 0.4}), _gen(4)))
    per_sample = out.flatten(1)
    assert (per_sample.max(1).values - per_sample.min(1).values).max() < 0.05  # uniform and grey stay so
    factor = per_sample.mean(1) / 128
    assert (factor >= 0.6 - 1e-3).all() and (factor <= 1.4 + 1e-3).all()
    assert factor.max() - factor.min() > 0.3


def test_color_jitter_changes_colour_of_a_coloured_image():
    red = torch.zeros(16, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 180
    red[:, 1] = 60
    out = _unnormalize(augment_batch(red, TrainConfig(**{**OFF, "color_jitter": 0.4}), _gen(4)))
    ratio = out[:, 1].mean((1, 2)) / out[:, 0].mean((1, 2))  # green/red: hue and saturation move it
    assert ratio.max() - ratio.min() > 0.05


def test_color_jitter_keeps_range():
    x = _images(8)
    out = augment_batch(x, TrainConfig(**{**OFF, "color_jitter": 1.0}), _gen())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x01 = out * std + mean
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5


def test_translation_moves_the_image_by_up_to_its_fraction_of_the_side():
    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 13:19, 13:19] = 255  # a white square in the middle
    out = augment_batch(x, TrainConfig(**{**OFF, "translate": 0.25}), _gen(5))
    white = out[:, 0] * 0.229 + 0.485  # back to [0, 1]: bilinear shifts keep the square's mass
    coords = torch.arange(32, dtype=torch.float32) + 0.5
    cy = (white.sum(2) * coords).sum(1) / white.sum((1, 2))
    cx = (white.sum(1) * coords).sum(1) / white.sum((1, 2))
    shift = torch.stack([cy - 16, cx - 16], 1)
    assert shift.abs().max() <= 0.25 * 32 + 1            # at most a quarter of the side
    assert (shift.abs() > 2).any(1).float().mean() > 0.5  # most images moved
    assert (white.sum((1, 2)) - 36).abs().max() < 1       # moved, not scaled
    torch.testing.assert_close(augment_batch(x, TrainConfig(**OFF), _gen(5)), normalize(x))
