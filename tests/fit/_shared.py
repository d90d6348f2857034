"""Location of the public scaling-law data (outside the project; never copied into it)."""

from pathlib import Path

import pytest

SHARED_FITS = Path(__file__).resolve().parents[2].parent / "shared/data/fits"


def shared_csv(name: str) -> Path:
    path = SHARED_FITS / name
    if not path.exists():
        reason = f"public scaling-law data {path} is absent (see shared/data/fits/README.md)"
        print(reason)
        pytest.skip(reason)
    return path
