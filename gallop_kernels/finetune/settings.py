"""What a resumed command checks against the run it continues: the same options (``compare --resume``,
``finetune --resume``). Torch-free."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..errors import GallopError

SAME_RESULTS = ("progress", "offload_grads")
"""Options a resumed run may change: they change no result (the offloaded gradient is the same bit for bit)."""


def plain(config) -> dict:
    """A dataclass as a saved report holds it: JSON types (tuples are lists)."""
    return json.loads(json.dumps(asdict(config)))


def check_same_options(folder: Path, there: dict, here: dict) -> None:
    """GallopError naming the first option (in name order, aside from SAME_RESULTS) whose saved value
    ``there`` differs from this command's ``here``: resuming must not mix two experiments."""
    differ = sorted(k for k in set(there) | set(here) if k not in SAME_RESULTS and there.get(k) != here.get(k))
    if differ:
        k = differ[0]
        raise GallopError(f"--resume: {folder} was made with other options ({k} {there.get(k)!r} there, "
                          f"{here.get(k)!r} here); give the same options")
