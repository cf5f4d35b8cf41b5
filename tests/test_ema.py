"""TrainConfig.ema_decay: the averaged weights, what is saved, and exact resume."""

import torch
from torch import nn

from core.training.ema import make_ema, warmed_decay


def test_ema_equals_the_closed_form_average_with_warm_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = make_ema(model, decay=0.9)
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(5, 3))  # moves BatchNorm's running statistics
        ema.update_parameters(model)
        current = {k: v.double() for k, v in model.state_dict().items()}
        if expected is None:
            expected = current  # the first update copies
        else:
            d = warmed_decay(0.9, n)
            expected = {k: (v if not v.is_floating_point() or "num_batches" in k else d * expected[k] + (1 - d) * v)
                        for k, v in current.items()}
    for key, value in ema.module.state_dict().items():
        assert torch.allclose(value.double(), expected[key], atol=1e-6), key
    assert ema.n_averaged.device.type == "cpu"  # the step count never waits for a GPU


def test_warm_up_then_the_configured_decay():
    assert warmed_decay(0.999, 0) == 0.1 and warmed_decay(0.999, 90) == 0.91
    assert warmed_decay(0.999, 100_000) == 0.999
