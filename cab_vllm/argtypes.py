"""Checked argparse types shared by the project's command lines (cab-serve, the load tester, the experiments).

Each raises argparse.ArgumentTypeError with ``expected <what>, got <the string>``; argparse prefixes the flag
("argument --sparsity: expected a number in [0, 1), got '1.5'"). Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Callable


def checked(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: the string parsed as ``kind`` (int or float; NaN never passes), then ``ok(value)``."""

    def parse(s: str):
        try:
            x = kind(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if (isinstance(x, float) and math.isnan(x)) or not ok(x):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return x

    parse.__name__ = expected  # what argparse names in its own messages
    return parse


sparsity = checked(float, lambda x: 0.0 <= x < 1.0, "a number in [0, 1)")
fraction = checked(float, lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]")
positive_int = checked(int, lambda x: x >= 1, "an integer >= 1")
nonneg_int = checked(int, lambda x: x >= 0, "an integer >= 0")
positive_float = checked(float, lambda x: 0.0 < x < math.inf, "a finite number > 0")
seconds = checked(int, lambda x: x >= 1, "a whole number of seconds >= 1")


def json_object(example: str) -> Callable[[str], dict]:
    """An argparse type: a JSON object (``example`` shows one in the error)."""

    def parse(s: str) -> dict:
        try:
            v = json.loads(s)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {s!r}") from None
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object such as '{example}', got {s!r}")
        return v

    parse.__name__ = "JSON object"
    return parse
