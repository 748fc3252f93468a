"""The base of every configuration section, and of each method's own section.

Kept apart from ``attnssl.config`` so that a method's module (the lower layer) can declare its
section without importing the configuration that gathers them (the upper one).
"""

from __future__ import annotations

from typing import get_args

from pydantic import BaseModel, ConfigDict, model_validator


def _mentions_bool(annotation) -> bool:
    if annotation is bool:
        return True
    return any(_mentions_bool(a) for a in get_args(annotation) if not isinstance(a, (str, int)))


class Section(BaseModel):
    """Unknown keys are refused, assignments validated, inf and nan refused (``optim.lr=.inf``
    would pass ``gt=0`` and blow up at the first step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data):
        """YAML reads ``true`` as a boolean and pydantic would take it as the number 1
        (``optim.batch_size=true`` trained at batch 1): refuse it where a number is expected."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None \
                        and not _mentions_bool(field.annotation):
                    raise ValueError(f"{key} must be a number, not the boolean {value!r}")
        return data


class MethodSection(Section):
    """The ``method:`` section: ``name`` picks the registered method, whose own section (a
    subclass declared beside the method) holds the rest."""

    name: str
