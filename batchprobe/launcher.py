"""What the launcher (torchrun) told this process, from its environment. No torch."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int | None:
    """This process's rank on its node under torchrun, else None."""
    local = os.environ.get("LOCAL_RANK")
    return int(local) if world_size() > 1 and local else None


def speaks() -> bool:
    """Whether this process prints and writes files: rank 0, or the only process."""
    return world_size() == 1 or int(os.environ.get("RANK", "0") or 0) == 0
