"""Mixup and CutMix (core/training/augment.py): what they do to a batch, its labels' mass, the loss, and a training run."""

import numpy as np
import pytest
import torch
from torch import nn

from core.training.augment import Mix, apply_mix, draw_mix, mix_rng, mix_targets, mixed_loss
from core.config import TrainConfig
from core.errors import UserError


def _batch(b: int = 8, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(b, 3, side, side), torch.tensor([0, 1, 2, 2, 1, 0, 3, 3])[:b]


def test_mix_targets_keep_each_images_and_each_classes_label_mass() -> None:
    x, y = _batch()
    gen = torch.Generator().manual_seed(1)
    cfg = TrainConfig(mixup_prob=1.0, mixup_alpha=0.4)
    mix = draw_mix(np.random.default_rng(0), cfg, x, gen)
    assert mix.kind == "mixup" and 0 < mix.lam < 1 and sorted(mix.perm.tolist()) == list(range(8))
    soft = mix_targets(y, mix, 4)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))                       # per image
    torch.testing.assert_close(soft.sum(0), torch.bincount(y, minlength=4).float())  # per class, over the batch
    assert (soft.max(1).values < 1).any()  # and they are soft


def test_mixup_blends_images_and_cutmix_pastes_a_box_weighted_by_its_area() -> None:
    x, _ = _batch()
    perm = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    mixed, mix = apply_mix(x, Mix("mixup", perm, 0.3), np.random.default_rng(0))
    torch.testing.assert_close(mixed, 0.3 * x + 0.7 * x[perm])
    for seed in range(5):
        cut, mix = apply_mix(x, Mix("cutmix", perm, 0.6), np.random.default_rng(seed))
        own = (cut == x).all(1).float().mean((1, 2))     # share of each image's own pixels left
        torch.testing.assert_close(own, torch.full((8,), mix.lam))
        assert 0.4 <= mix.lam <= 1.0 and ((cut == x) | (cut == x[perm])).all()


def test_the_mixed_loss_is_cross_entropy_against_the_soft_targets() -> None:
    torch.manual_seed(2)
    logits, y = torch.randn(8, 4), _batch()[1]
    mix = Mix("mixup", torch.randperm(8), 0.35)
    for smoothing in (0.0, 0.1):
        criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
        soft = nn.CrossEntropyLoss(label_smoothing=smoothing)(logits, mix_targets(y, mix, 4))
        torch.testing.assert_close(mixed_loss(criterion, logits, y, mix), soft)
    assert mixed_loss(criterion, logits, y, None) == criterion(logits, y)
    # class weights still apply: each part weighted as an unmixed batch's loss
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.0, 1.0, 5.0]))
    expected = 0.35 * weighted(logits, y) + 0.65 * weighted(logits, y[mix.perm])
    torch.testing.assert_close(mixed_loss(weighted, logits, y, mix), expected)
    assert not torch.isclose(mixed_loss(weighted, logits, y, mix), mixed_loss(nn.CrossEntropyLoss(), logits, y, mix))


def test_probabilities_choose_mixup_then_cutmix_and_off_draws_nothing() -> None:
    x, _ = _batch()
    gen = torch.Generator().manual_seed(0)
    assert mix_rng(TrainConfig(), gen) is None  # off: no extra draw from the run's generator
    rng = np.random.default_rng(0)
    kinds = [getattr(draw_mix(rng, TrainConfig(mixup_prob=0.3, cutmix_prob=0.5), x, gen), "kind", None)
             for _ in range(2000)]
    shares = {k: kinds.count(k) / len(kinds) for k in ("mixup", "cutmix", None)}
    assert shares["mixup"] == pytest.approx(0.3, abs=0.04) and shares["cutmix"] == pytest.approx(0.35, abs=0.04)
    for key, value in (("mixup_prob", 1.5), ("cutmix_alpha", 0.0)):
        with pytest.raises(UserError, match=key):
            TrainConfig(**{key: value})


def test_a_run_with_mixup_and_cutmix_trains(tmp_path) -> None:
    from core.data.dataset import SplitOptions, load_dataset
    from core.data.demo_data import generate_demo
    from core.train import RunOptions, train

    root = generate_demo(tmp_path / "data", n_lesions=24, image_size=32, seed=2)
    data = load_dataset(root, 32, SplitOptions(0.2, 0.2), progress=False, masks=False)
    cfg = TrainConfig(image_size=32, epochs=1, batch_size=16, pretrained="none", warmup_epochs=0.0,
                      mixup_prob=0.5, cutmix_prob=1.0, class_weighting="inverse", eval_batch_size=64)
    result = train(cfg, data, tmp_path / "run", options=RunOptions(progress=False, tensorboard=False))
    assert result.epochs_run == 1 and np.isfinite(result.history[0]["train_loss"])
