"""The one configuration of a training run: typed, frozen, documented, validated when built.

Defaults live here and nowhere else. Build from a dict (``TrainConfig.from_dict``), from
``key=value`` overrides (``TrainConfig().with_overrides([...])``) or from a ``config.json``
(``TrainConfig.load``); an unknown key, a value of the wrong type or one out of range raises
:class:`~core.errors.UserError` naming the key.

    python -c "from core.config import TrainConfig; print(TrainConfig.describe())"
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from core.io.state_files import read_json_object
from core.errors import UserError
from core.metric_names import DEFAULT_METRIC, SELECT_METRICS

CLASS_WEIGHTINGS = ("none", "inverse", "sqrt_inverse", "effective")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
SAMPLINGS = ("uniform", "sqrt", "balanced")
IMAGE_SIZES = (16, 1024)   # the smallest and largest image side, in pixels: checked by image_size_ok only
ARCHS = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_large",
         "regnet_y_800mf")   # core/model/networks.py builds each
DEFAULT_ARCH = ARCHS[0]   # the default, and what a model file without an arch holds
METADATA_METHODS = ("none", "concat", "film")


def image_size_ok(size: object) -> bool:
    """``size`` is an image side core supports: an integer in IMAGE_SIZES (TrainConfig and
    core.data.dataset.load_dataset both ask here, each saying so in its own error's words)."""
    return isinstance(size, int) and IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


# The split shares, stated once: their defaults and their rule (core/data/splits.py draws the splits).
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
MAX_HELD_OUT = 0.9   # val + test stay below this: at least a tenth of the images is left for training


def check_fractions(val_fraction: float, test_fraction: float, *, allow_zero_val: bool = False) -> None:
    """Shares of the images: 0 < val < 1 (0 <= val where a split comes from elsewhere), 0 <= test < 1 and
    val + test < MAX_HELD_OUT."""
    low = 0 <= val_fraction if allow_zero_val else 0 < val_fraction
    if not (low and val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < MAX_HELD_OUT):
        raise UserError(f"split fractions val={val_fraction}, test={test_fraction}: need 0 < val < 1, "
                        f"0 <= test < 1 and val + test < {MAX_HELD_OUT:g}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on, apart from the data path."""

    # --- optimisation -------------------------------------------------------------------------
    lr: float = _doc("Peak learning rate, reached after warm-up, then cosine-decayed.", default=1e-3)
    weight_decay: float = _doc("Decoupled weight decay (AdamW) or L2 (SGD).", default=1e-4)
    optimizer: str = _doc("Optimiser: 'adamw' or 'sgd' (Nesterov, momentum 0.9).", default="adamw")
    batch_size: int = _doc("Training batch size.", default=64)
    epochs: int = _doc("Number of training epochs.", default=10)
    warmup_epochs: float = _doc("Linear learning-rate warm-up, in epochs (fractions allowed).", default=1.0)
    min_lr_ratio: float = _doc("Learning rate at the end of the cosine schedule, as a fraction of lr.",
                               default=0.01)
    label_smoothing: float = _doc("Label smoothing of the cross-entropy loss, in [0, 0.5).", default=0.0)
    class_weighting: str = _doc("Loss weights per class: 'none', 'inverse' frequency, 'sqrt_inverse', or "
                                "'effective' number of samples (Cui et al. 2019).", default="none")
    effective_beta: float = _doc("Beta of the 'effective' class weighting, in [0, 1).", default=0.999)
    sampling: str = _doc("How training batches draw images: 'uniform' (every image once per epoch), 'sqrt' (a "
                         "class drawn with probability proportional to the square root of its image count) or "
                         "'balanced' (every class equally often); the last two draw with replacement, as many "
                         "images per epoch as 'uniform'.", default="uniform")
    ema_decay: float = _doc("Exponential moving average of the weights (and BatchNorm statistics) per step; the "
                            "average is the model that is validated and saved. 0 turns it off; e.g. 0.999 (the "
                            "decay warms up as min(decay, (1 + n) / (10 + n)) after n steps).", default=0.0)
    seed: int = _doc("Seed for initialisation, shuffling and augmentation.", default=0)

    # --- data ---------------------------------------------------------------------------------
    image_size: int = _doc("Side of the square training images, in pixels (images are decoded once "
                           "to this size).", default=128)
    val_fraction: float = _doc("Share of the images held out for validation (whole lesions, stratified by "
                               "class; rule: check_fractions).", default=VAL_FRACTION)
    test_fraction: float = _doc("Share of the images held out for the final test (whole lesions; never seen by a "
                                "sweep).", default=TEST_FRACTION)
    split_seed: int = _doc("Seed of the lesion-grouped, class-stratified split.", default=0)

    # --- augmentation (per sample, on the training device) ------------------------------------
    hflip: bool = _doc("Random horizontal flips.", default=True)
    vflip: bool = _doc("Random vertical flips.", default=True)
    rot90: bool = _doc("Random rotations by multiples of 90 degrees.", default=True)
    rotation_degrees: float = _doc("Extra random rotation in [-d, d] degrees; 0 turns it off.", default=0.0)
    crop_scale_min: float = _doc("Random resized crop: smallest area fraction kept; 1 turns it off.",
                                 default=0.6)
    translate: float = _doc("Random translation by up to this fraction of the side, in x and y (the image "
                            "reflected at its borders); 0 turns it off.", default=0.0)
    color_jitter: float = _doc("Colour jitter strength (brightness, contrast, saturation; hue at a "
                               "quarter of it); 0 turns it off.", default=0.1)
    mixup_prob: float = _doc("Probability that a training batch is mixed with a shuffled copy of itself (mixup, "
                             "Zhang et al. 2018; one Beta(mixup_alpha, mixup_alpha) weight per batch, the loss "
                             "against the mixed labels); 0 turns it off.", default=0.0)
    mixup_alpha: float = _doc("Beta distribution parameter of mixup's mixing weight (small: weights near 0 or 1).",
                              default=0.2)
    cutmix_prob: float = _doc("Probability that a batch not mixed by mixup gets a box pasted from a shuffled copy "
                              "of itself (CutMix, Yun et al. 2019; labels mixed by the box's area); 0 turns it off.",
                              default=0.0)
    cutmix_alpha: float = _doc("Beta distribution parameter of CutMix's box area fraction.", default=1.0)

    # --- model --------------------------------------------------------------------------------
    arch: str = _doc("Backbone, from torchvision: " + ", ".join(ARCHS) + ". Its classifier is replaced by "
                     "one for the dataset's classes; the model file records it.", default=DEFAULT_ARCH)
    pretrained: str = _doc("Initial weights: 'imagenet' (torchvision's IMAGENET1K_V1 weights of the arch via the "
                           "torch hub cache), 'none', or a path to a state_dict file.", default="imagenet")
    metadata: str = _doc("How the clinical fields enter the model: 'none', 'concat' (age, sex and site through a small "
                         "MLP, concatenated to the pooled image features before the classifier) or 'film' (the "
                         "MLP scales and shifts each pooled feature); needs a dataset with age, sex and "
                         "localization columns (HAM10000, ISIC 2018 with its metadata CSV).", default="none")
    metadata_dropout: float = _doc("In training, each clinical field of each image is set to unknown with this "
                                   "probability, so that the model also works when a field is not known.",
                                   default=0.0)
    box_loss_weight: float = _doc("A box head beside the classifier, on the pooled image features, learns where the "
                                  "lesion is from the dataset's lesion masks (the box around each mask, moved with "
                                  "the image by every augmentation; core/model/box_head.py): its loss (L1 plus GIoU) is "
                                  "added with this weight. 0 turns the head off; a dataset without masks trains "
                                  "without it (a warning).", default=0.0)

    # --- execution ----------------------------------------------------------------------------
    device: str = _doc("'auto' (CUDA when available), 'cpu' or 'cuda'.", default="auto")
    precision: str = _doc("'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32'.", default="auto")
    channels_last: bool = _doc("Use channels_last memory format on CUDA, and on the CPU with bf16 (where "
                               "oneDNN's bf16 convolutions want it).", default=True)
    compile: bool = _doc("torch.compile the model (pays off on long GPU runs only).", default=False)
    eval_batch_size: int = _doc("Batch size for validation and test passes.", default=256)
    select_metric: str = _doc("Validation metric that picks the best checkpoint (loss is minimised, the "
                              "rest maximised).", default=DEFAULT_METRIC)

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            ("lr", 0 < self.lr <= 10, "must be in (0, 10]"),
            ("weight_decay", 0 <= self.weight_decay <= 1, "must be in [0, 1]"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            ("batch_size", 1 <= self.batch_size <= 65536, "must be in [1, 65536]"),
            ("epochs", 1 <= self.epochs <= 10000, "must be in [1, 10000]"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, "must be in [0, epochs]"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
            ("class_weighting", self.class_weighting in CLASS_WEIGHTINGS, f"must be one of {CLASS_WEIGHTINGS}"),
            ("effective_beta", 0 <= self.effective_beta < 1, "must be in [0, 1)"),
            ("sampling", self.sampling in SAMPLINGS, f"must be one of {SAMPLINGS}"),
            ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)"),
            ("image_size", image_size_ok(self.image_size), "must be in [%d, %d]" % IMAGE_SIZES),
            ("rotation_degrees", 0 <= self.rotation_degrees <= 180, "must be in [0, 180]"),
            ("crop_scale_min", 0.05 <= self.crop_scale_min <= 1, "must be in [0.05, 1]"),
            ("translate", 0 <= self.translate <= 0.5, "must be in [0, 0.5]"),
            ("color_jitter", 0 <= self.color_jitter <= 1, "must be in [0, 1]"),
            ("mixup_prob", 0 <= self.mixup_prob <= 1, "must be in [0, 1]"),
            ("mixup_alpha", 0 < self.mixup_alpha <= 10, "must be in (0, 10]"),
            ("cutmix_prob", 0 <= self.cutmix_prob <= 1, "must be in [0, 1]"),
            ("cutmix_alpha", 0 < self.cutmix_alpha <= 10, "must be in (0, 10]"),
            ("arch", self.arch in ARCHS, f"must be one of {ARCHS}"),
            ("metadata", self.metadata in METADATA_METHODS, f"must be one of {METADATA_METHODS}"),
            ("metadata_dropout", 0 <= self.metadata_dropout <= 1, "must be in [0, 1]"),
            ("box_loss_weight", 0 <= self.box_loss_weight <= 100, "must be in [0, 100]"),
            ("pretrained", bool(self.pretrained), "must be 'imagenet', 'none' or a file path"),
            ("device", self.device in DEVICES, f"must be one of {DEVICES}"),
            ("precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}"),
            ("eval_batch_size", 1 <= self.eval_batch_size <= 65536, "must be in [1, 65536]"),
            ("select_metric", self.select_metric in SELECT_METRICS, f"must be one of {SELECT_METRICS}"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise UserError(f"config key '{key}' = {getattr(self, key)!r}: {why}")
        try:
            check_fractions(self.val_fraction, self.test_fraction)
        except UserError as exc:
            raise UserError(f"config keys 'val_fraction' = {self.val_fraction!r}, 'test_fraction' = "
                            f"{self.test_fraction!r}: {exc}") from None

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _field_type(f)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # 1 is a fine float
                continue
            if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool) \
                    or not isinstance(value, kind):
                raise UserError(f"config key '{f.name}' = {value!r}: expected {kind.__name__}, "
                                f"got {type(value).__name__}")
            if kind is float and not math.isfinite(value):
                raise UserError(f"config key '{f.name}' = {value!r}: must be finite")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """Build from ``values`` on top of ``base`` (default: the defaults); unknown keys are errors."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            hint = _closest(unknown[0], cls.keys())
            raise UserError(f"unknown config key '{unknown[0]}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        return dataclasses.replace(base or cls(), **dict(values))

    def with_overrides(self, assignments: Iterable[str]) -> "TrainConfig":
        """Apply ``key=value`` strings (as given to ``--set``), each value parsed by the key's type."""
        values: dict[str, Any] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise UserError(f"--set expects key=value, got '{item}'")
            values[key] = parse_value(key, raw.strip())
        return TrainConfig.from_dict(values, base=self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a ``config.json`` written by :meth:`to_json`."""
        values = read_json_object(path, "no such config file")
        try:
            return cls.from_dict(values)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    @classmethod
    def describe(cls) -> str:
        """One line per key: name, type, default and its documentation (for --help texts)."""
        lines = []
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name} ({_field_type(f).__name__}, default {f.default!r}): {f.metadata['doc']}")
        return "\n".join(lines)


def _field_type(f: dataclasses.Field) -> type:
    return {"float": float, "int": int, "str": str, "bool": bool}[str(f.type)]


def field_type(key: str) -> type:
    """The Python type of config key ``key``; an unknown key is a :class:`UserError`."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == key:
            return _field_type(f)
    hint = _closest(key, TrainConfig.keys())
    raise UserError(f"unknown config key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))


def parse_value(key: str, raw: str) -> Any:
    """Parse the text ``raw`` as a value of config key ``key``."""
    kind = field_type(key)
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise UserError(f"config key '{key}': cannot read '{raw}' as {kind.__name__}") from None


def _closest(name: str, choices: Iterable[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None
