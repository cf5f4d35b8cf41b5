"""Clinical fields as model input: age, sex and anatomical site, validated and encoded as numbers.

The encoding (its *spec*, stored in the model file so the file is read the same way later):

- age: ``age / 100`` and a missing flag (1 when unknown, the value then 0); ages outside [0, 120] are errors;
- sex: one-hot over ``SEXES``; unknown = all zeros;
- site: one-hot over ``SITES`` (HAM10000's ``localization`` names; ISIC's coarse ``anatom_site_general``
  names are mapped onto them, see ``SITE_ALIASES``); unknown = all zeros.

Never ``dx_type`` (how the label was established: it would leak the label) and nothing that identifies the
patient or acquisition (lesion or image ids). ``metadata_dropout`` sets fields to unknown in training
(:func:`drop_fields`, on the device), so a model still predicts when a field is not known.

    python -c "from core.model.fields import make_spec; print(make_spec('concat'))"
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np
import torch

from core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

FIELDS = ("age", "sex", "site")
SEXES = ("female", "male")
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
         "neck", "scalp", "trunk", "upper extremity")
# ISIC archive names (anatom_site_general) -> the HAM10000 name they cover; head/neck spans several, so unknown.
SITE_ALIASES = {"anterior torso": "chest", "posterior torso": "back", "lateral torso": "trunk", "torso": "trunk",
                "palms/soles": "acral", "oral/genital": "genital", "head/neck": None}
UNKNOWN = ("", "unknown", "nan", "na", "n/a", "none")
AGE_RANGE = (0.0, 120.0)
AGE_SCALE = 100.0
# Columns of a dataset's label table that hold each field, first found wins (HAM10000, then ISIC's names).
COLUMNS = {"age": ("age", "age_approx"), "sex": ("sex",),
           "site": ("localization", "anatom_site_general", "anatom_site_general_challenge")}
SPEC_VERSION = 1


def make_spec(method: str) -> dict[str, Any] | None:
    """The encoding of config ``metadata=method``; None for 'none' (an image-only model)."""
    if method == "none":
        return None
    return {"version": SPEC_VERSION, "method": method, "fields": list(FIELDS), "age_scale": AGE_SCALE,
            "age_range": list(AGE_RANGE), "sexes": list(SEXES), "sites": list(SITES),
            "width": 2 + len(SEXES) + len(SITES)}


class MetadataSource(Protocol):
    """What encode_dataset reads of a core.data.dataset.Dataset (a Protocol: core/model stands below core/data)."""

    @property
    def metadata(self) -> pd.DataFrame | None: ...
    @property
    def image_ids(self) -> np.ndarray: ...
    @property
    def root(self) -> str: ...
    @property
    def layout(self) -> str: ...


def _unknown(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and value.strip().lower() in UNKNOWN)


def _age(value: object) -> float | None:
    if _unknown(value):
        return None
    try:
        age = float(value)
    except (TypeError, ValueError):
        raise UserError(f"clinical field 'age' = {value!r}: not a number (years, or empty for unknown)") from None
    if isinstance(value, bool) or not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise UserError(f"clinical field 'age' = {value!r}: out of range [{AGE_RANGE[0]:g}, {AGE_RANGE[1]:g}]")
    return age


def _choice(field: str, value: object, allowed: Sequence[str], aliases: Mapping[str, str | None]) -> str | None:
    if _unknown(value):
        return None
    text = str(value).strip().lower()
    if text in aliases:
        return aliases[text]
    if text not in allowed:
        raise UserError(f"clinical field '{field}' = {value!r}: not one of {', '.join(allowed)} (or unknown)")
    return text


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with each field checked and normalised (None = unknown); a bad value is a UserError."""
    extra = [k for k in record if k not in FIELDS]
    if extra:
        raise UserError(f"unknown clinical field '{extra[0]}' (expected {', '.join(FIELDS)})")
    return {"age": _age(record.get("age")), "sex": _choice("sex", record.get("sex"), SEXES, {}),
            "site": _choice("site", record.get("site"), SITES, SITE_ALIASES)}


def encode_records(records: Sequence[Mapping[str, Any]], spec: Mapping[str, Any] | None) -> np.ndarray:
    """float32 [N, width]: each record's fields encoded by ``spec`` ([N, 0] for an image-only model)."""
    if spec is None:
        return np.zeros((len(records), 0), np.float32)
    sexes, sites = list(spec["sexes"]), list(spec["sites"])
    out = np.zeros((len(records), int(spec["width"])), np.float32)
    for row, record in enumerate(records):
        clean = validate_record(record)
        if clean["age"] is None:
            out[row, 1] = 1.0
        else:
            out[row, 0] = clean["age"] / float(spec["age_scale"])
        if clean["sex"] in sexes:
            out[row, 2 + sexes.index(clean["sex"])] = 1.0
        if clean["site"] in sites:
            out[row, 2 + len(sexes) + sites.index(clean["site"])] = 1.0
    return out


def unknown_rows(n: int, spec: Mapping[str, Any]) -> np.ndarray:
    """The encoding of ``n`` records whose every field is unknown."""
    return encode_records([{}] * n, spec)


def table_records(table: pd.DataFrame | None, image_ids: Sequence[str], source: str) -> list[dict[str, Any]]:
    """Records of a dataset's label table (pandas, row i = image i), each field validated.

    A missing column, or a value that cannot be read (named with its image), is a UserError.
    """
    if table is None:
        raise UserError(f"{source}: this dataset has no metadata table (age, sex, localization)")
    columns = {}
    for field, names in COLUMNS.items():
        found = [c for c in table.columns if str(c).strip().lower() in names]
        if not found:
            raise UserError(f"{source}: metadata column '{names[0]}' missing (found: "
                            f"{', '.join(map(str, table.columns)) or 'none'})")
        columns[field] = found[0]
    values = {field: table[column].tolist() for field, column in columns.items()}
    records = []
    for row, image_id in enumerate(image_ids):
        record = {field: values[field][row] for field in FIELDS}
        try:
            records.append(validate_record(record))
        except UserError as exc:
            raise UserError(f"{source}: image {image_id}: {exc}") from None
    return records


def encode_dataset(data: MetadataSource, spec: Mapping[str, Any]) -> np.ndarray:
    """float32 [N, width] of a core.data.dataset.Dataset's images; a layout without metadata is a UserError."""
    if data.metadata is None:
        raise UserError(f"{data.root}: the {data.layout} layout carries no metadata (age, sex, localization), "
                        f"but the model uses metadata={spec['method']}; use metadata=none, or a HAM10000 / "
                        f"ISIC 2018 copy with its metadata CSV")
    return encode_records(table_records(data.metadata, data.image_ids, data.root), spec)


def drop_fields(clinical: torch.Tensor, spec: Mapping[str, Any], p: float, generator: torch.Generator) -> torch.Tensor:
    """Each field of each row set to unknown with probability ``p`` (config ``metadata_dropout``), on
    ``clinical``'s device."""
    if p <= 0:
        return clinical
    n_sex = len(spec["sexes"])
    keep = (torch.rand(clinical.shape[0], len(FIELDS), generator=generator, device=clinical.device) >= p).float()
    age, sex, site = keep[:, :1], keep[:, 1:2], keep[:, 2:3]
    out = torch.cat([clinical[:, :1] * age, 1 - (1 - clinical[:, 1:2]) * age,
                     clinical[:, 2:2 + n_sex] * sex, clinical[:, 2 + n_sex:] * site], dim=1)
    return out
