"""What every façade operation returns to the surfaces that called it."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Reply:
    body: Any
    status: int = 200
    missing: tuple[str, ...] = ()
