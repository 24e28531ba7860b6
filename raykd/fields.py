"""Field helpers shared by every part's config dataclass: a default plus its help text.

The help text is the documentation: `docs/jobs.md` is generated from it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from typing import Any


def doc(default: Any, help: str) -> Any:
    """A field with a default and a help text."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def required(help: str) -> Any:
    """A field the job file must set."""
    return field(default=None, metadata={"help": help, "required": True})
