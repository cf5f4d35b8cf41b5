"""Which heat-map method points at the lesion: Grad-CAM variants side by side with the uniform and centred baselines.

    python -m bench.gradcam_study --model results/dev/ham64-base/best.pt \\
        --splits results/dev/ham64-base/splits.csv --split val --threads 2 --out results/gradcam-study/val.json

For each model (``--model``, repeatable) and each method (``--methods``, comma-separated), the heat
maps of the predicted class on every image of ``--split`` that has a lesion mask, scored by
core/explain/mask_scores.py: energy inside the lesion, pointing hits, mean pairwise map correlation (the
position-bias alarm). The table gives the uniform and centred-Gaussian baselines and the masks' own
correlation on the same images. Choose on ``--split val``; report ``--split test`` only for the
choice made there (never tune to test).

Methods (``<kind>:<layer>``, layers layer2|layer3|layer4; ``auto`` is core.explain.gradcam.choose_layer's):
  gradcam:L      Captum LayerGradCam on stage L, bilinearly upsampled (the project's default, layer chosen by size)
  stages:L1+L2   mean of the max-normalised upsampled LayerGradCam maps of several stages
  product:L1+L2  their product (where the stages agree)
  guided:L       Captum GuidedGradCam on stage L (guided backprop x Grad-CAM), |.| summed over colours
  gbp, saliency  Captum GuidedBackprop / Saliency alone, |.| summed over colours
  any of them followed by @S: the map blurred by a Gaussian of sigma S px (e.g. guided:layer2@2)
  tta:L          LayerGradCam averaged over the 8 flips/quarter turns of the image, each map turned back
  shift:L        LayerGradCam averaged over 9 translations of the image (reflected, by an eighth of the side)
  tta-shift:L    both: 8 x 9 = 72 views

The data is ``--data`` (default ../shared/data/ham10000-200x150), decoded at the model's image size.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError, run_cli

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
HAM10000 = REPO.parent / "shared" / "data" / "ham10000-200x150"
DEFAULT_METHODS = "gradcam:auto,gradcam:layer2,gradcam:layer3,gradcam:layer4,stages:layer2+layer3," \
                  "stages:layer2+layer3+layer4,product:layer2+layer3,guided:auto,tta:auto,tta:layer3"


def layer_cam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str) -> torch.Tensor:
    """Raw LayerGradCam of normalised images x, upsampled to their size: [B, H, W] (ReLU'd)."""
    from captum.attr import LayerAttribution, LayerGradCam

    from core.model.networks import gradcam_layer

    attribution = LayerGradCam(model, gradcam_layer(model, layer)).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(attribution, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0].detach()


def _max_normalised(maps: torch.Tensor) -> torch.Tensor:
    peak = maps.flatten(1).max(1).values.clamp_min(1e-30)
    return maps / peak[:, None, None]


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    return torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))


def _undo_dihedral(m: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    m = torch.rot90(m, -k, dims=(-2, -1))
    return m.flip(-1) if flip else m


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels, filling from the reflected image (as augment.py's grid_sample does)."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def _unshift(m: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The map translated back, and where it is defined (pixels that came from outside the image are not)."""
    h, w = m.shape[-2:]
    out = torch.zeros_like(m)
    valid = torch.zeros_like(m)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[..., yd, xd] = m[..., ys, xs]
    valid[..., yd, xd] = 1
    return out, valid


def make_method(spec: str, image_size: int) -> tuple[str, Callable]:
    """(display name, function(model, x normalised, target) -> maps [B, H, W]); ``@S`` blurs by sigma S px."""
    spec, _, sigma = spec.partition("@")
    label, fn = _make_method(spec, image_size)
    if not sigma:
        return label, fn
    return f"{label}@{sigma}", lambda model, x, t: _blur(fn(model, x, t)[:, None], float(sigma))[:, 0]


def _make_method(spec: str, image_size: int) -> tuple[str, Callable]:
    from core.explain.gradcam import choose_layer

    kind, _, arg = spec.partition(":")
    default = choose_layer(image_size, "guided" if kind == "guided" else "gradcam")
    layers = [default if name == "auto" else name for name in (arg or "auto").split("+")]
    for name in layers:
        if name not in ("layer2", "layer3", "layer4"):
            raise UserError(f"method {spec}: unknown layer {name!r}")
    layer = layers[0]
    label = f"{kind}:{'+'.join(layers)}"
    if kind == "gradcam":
        return label, lambda model, x, t: layer_cam(model, x, t, layer)
    if kind in ("stages", "product"):
        def combined(model, x, t):
            maps = [_max_normalised(layer_cam(model, x, t, name)) for name in layers]
            return torch.stack(maps).mean(0) if kind == "stages" else torch.stack(maps).prod(0)
        return label, combined
    if kind == "guided":
        def guided(model, x, t):
            from captum.attr import GuidedGradCam

            from core.model.networks import gradcam_layer

            attribution = GuidedGradCam(model, gradcam_layer(model, layer)).attribute(x, target=t)
            return attribution.detach().abs().sum(1)
        return label, guided
    if kind in ("gbp", "saliency"):
        def pixelwise(model, x, t):
            from captum.attr import GuidedBackprop, Saliency

            method = GuidedBackprop(model) if kind == "gbp" else Saliency(model)
            return method.attribute(x, target=t).detach().abs().sum(1)
        return kind, pixelwise
    if kind in ("tta", "shift", "tta-shift"):
        step = max(1, image_size // 8)
        shifts = [(dy, dx) for dy in (-step, 0, step) for dx in (-step, 0, step)] if "shift" in kind else [(0, 0)]
        turns = [(k, f) for f in (False, True) for k in range(4)] if kind != "shift" else [(0, False)]

        def averaged(model, x, t):
            total = torch.zeros(x.shape[0], *x.shape[-2:])
            weight = torch.zeros_like(total)
            for k, flip in turns:
                for dy, dx in shifts:
                    view = _shift(_dihedral(x, k, flip), dy, dx)
                    m, valid = _unshift(layer_cam(model, view, t, layer), dy, dx)
                    total += _undo_dihedral(m, k, flip)
                    weight += _undo_dihedral(valid, k, flip)
            return total / weight.clamp_min(1)
        return label, averaged
    raise UserError(f"unknown method kind {kind!r} in {spec!r}")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def run_method(model: torch.nn.Module, fn: Callable, images: np.ndarray, targets: np.ndarray,
               batch_size: int = 64) -> np.ndarray:
    from core.model.forward import normalize

    out = np.zeros((len(images), *images.shape[-2:]), dtype=np.float32)
    with torch.enable_grad():
        for start in range(0, len(images), batch_size):
            x = normalize(torch.as_tensor(images[start:start + batch_size]))
            t = torch.as_tensor(targets[start:start + batch_size], dtype=torch.long)
            out[start:start + len(x)] = fn(model, x, t).float().numpy()
            model.zero_grad(set_to_none=True)
    return out


def _load(spec: str) -> tuple[torch.nn.Module, dict]:
    """A model file, or ``random@SIZE``: an untrained ResNet-18 (seed 0), the sanity check of a method
    (Adebayo et al. 2018): a method whose maps score as well on it explains the image, not the model."""
    from core.model.networks import build_model, load_model_file

    if spec.startswith("random@"):
        torch.manual_seed(0)
        return build_model(7, "none").eval(), {"image_size": int(spec.split("@")[1]), "config": {}}
    return load_model_file(spec)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gradcam_study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", action="append", required=True,
                        help="a model file (best.pt / model.pt), or random@SIZE (untrained: the sanity check); "
                             "repeatable")
    parser.add_argument("--data", default=str(HAM10000), help="dataset with lesion masks")
    parser.add_argument("--splits", help="splits.csv of the training run (its split exactly)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--limit", type=int, help="at most this many images (the first ones), for a quick look")
    parser.add_argument("--per-class", action="store_true", help="also print the table per true class")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="write every figure as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from core.explain import mask_scores as es
    from core.io.atomic import write_json
    from core.data.dataset import SplitOptions, load_dataset
    from core.model.inference import predict_probs

    results = []
    data_cache: dict[int, object] = {}
    for model_path in args.model:
        model, header = _load(model_path)
        cfg = header.get("config") or {}
        size = int(header["image_size"])
        if size not in data_cache:
            splits = SplitOptions(cfg.get("val_fraction", 0.15), cfg.get("test_fraction", 0.15),
                                  cfg.get("split_seed", 0), args.splits)
            data_cache[size] = load_dataset(args.data, size, splits, progress=False)
        data = data_cache[size]
        if data.masks is None:
            raise UserError(f"{args.data}: no lesion masks found")
        idx = data.indices(args.split)
        idx = idx[data.has_mask[idx]][:args.limit]
        images, masks, labels = np.asarray(data.images[idx]), np.asarray(data.masks[idx]), data.labels[idx]
        probs = predict_probs(model, images, "cpu", 256, "fp32")
        targets = probs.argmax(1)
        base = es.baselines(masks)
        print(f"\n{model_path}: {size} px, {len(idx)} {args.split} images with masks, "
              f"accuracy {np.mean(targets == labels):.3f}")
        header = f"{'method':<34} {'energy in':>9} {'pointing':>9} {'map corr':>9} {'seconds':>8}"
        print(header + "\n" + "-" * len(header))
        print(f"{'uniform (baseline)':<34} {base['uniform']['energy_inside']:>9.3f} {'-':>9} {'-':>9}")
        print(f"{'centred Gaussian (baseline)':<34} {base['centred_gaussian']['energy_inside']:>9.3f} "
              f"{base['centred_gaussian']['pointing']:>9.3f} {1.0:>9.3f}")
        print(f"{'lesion masks themselves':<34} {'-':>9} {'-':>9} {base['masks']['map_correlation']:>9.3f}")
        rows = []
        for spec in args.methods.split(","):
            label, fn = make_method(spec.strip(), size)
            started = time.perf_counter()
            maps = run_method(model, fn, images, targets)
            seconds = time.perf_counter() - started
            scores = es.score_maps(maps, masks, labels, data.class_names, label)
            overall = scores["overall"]["gradcam"]
            print(f"{label:<34} {overall['energy_inside']:>9.3f} {overall['pointing']:>9.3f} "
                  f"{overall['map_correlation'] if overall['map_correlation'] is not None else float('nan'):>9.3f} "
                  f"{seconds:>8.1f}", flush=True)
            if args.per_class:
                for line in es.table(scores):
                    print("    " + line)
            rows.append({"method": label, "seconds": seconds, "scores": scores})
        results.append({"model": str(model_path), "image_size": size, "split": args.split, "n_images": int(len(idx)),
                        "accuracy": float(np.mean(targets == labels)), "baselines": base, "methods": rows})
    if args.out:
        write_json(args.out, {"command": " ".join(["python -m bench.gradcam_study", *(argv or __import__("sys").argv[1:])]),
                              "data": args.data, "results": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
