"""The optional clinical fields of a request (age, sex, site) checked and normalised, with or without a model.

Follows the contract of core/metadata.py's ``validate_record`` (the model work, issue 22), which this
module stands in for until that is merged: missing or "unknown" -> None, out of range or unparsable ->
UserError naming the field and value. Once core/metadata.py is on main, :func:`validate_record` becomes an
import of it.
"""

from __future__ import annotations

import math
from typing import Mapping

from core.errors import UserError

FIELDS = ("age", "sex", "site")
SEXES = ("male", "female")
# HAM10000's localization values (its metadata CSV), "unknown" aside.
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck",
         "scalp", "trunk", "upper extremity")
AGE_RANGE = (0.0, 120.0)
UNKNOWN = ("", "unknown")


def validate_record(record: Mapping[str, object]) -> dict[str, object]:
    """{"age": float | None, "sex": str | None, "site": str | None}; UserError naming a bad field and its value."""
    unknown = set(record) - set(FIELDS)
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; expected {', '.join(FIELDS)}")
    return {"age": _age(record.get("age")), "sex": _choice("sex", record.get("sex"), SEXES),
            "site": _choice("site", record.get("site"), SITES)}


def _age(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in UNKNOWN):
        return None
    try:
        age = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"age {value!r}: not a number") from None
    if not math.isfinite(age) or not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise UserError(f"age {value!r}: out of range [{AGE_RANGE[0]:g}, {AGE_RANGE[1]:g}]")
    return age


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in UNKNOWN:
        return None
    if text not in allowed:
        raise UserError(f"{field} {str(value)[:40]!r}: not one of {', '.join(allowed)} (or unknown)")
    return text
