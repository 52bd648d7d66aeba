"""Argument types shared by the command lines (train, evaluate, demo, data.convert, data.synthetic): a
bad value is an argparse usage error naming the flag, not a failure deep inside a run."""
from __future__ import annotations

import argparse


def int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= minimum (and <= maximum, if given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
MAX_SEED = 2**32 - 1  # numpy's RandomState (the synthetic data) and SeedSequence take seeds in [0, 2**32)
SEED = int_at_least(0, MAX_SEED)
