"""batchprobe: the largest micro-batch that trains on your device, and the plan that follows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from batchprobe.results import FindMaxResult
    from batchprobe.spec import Spec

__all__ = ["__version__", "find_max_batch_size", "load_spec"]


def load_spec(path: Any = None, overrides: Any = (), **kwargs: Any) -> Spec:
    """Read and validate a YAML spec (see `batchprobe.spec.load_spec`)."""
    from batchprobe.spec import load_spec as _load

    return _load(path, overrides, **kwargs)


def find_max_batch_size(spec: Spec) -> FindMaxResult:
    """Largest micro-batch that completes full training steps. Raises NothingFitsError when
    batch 1 does not fit and ModelError when the model fails for a reason other than memory."""
    from batchprobe.errors import ModelError, NothingFitsError
    from batchprobe.session import open_session

    result = open_session(spec).search()
    error = result.error
    if error is not None and error.failure is not None:
        raise ModelError(
            f"the model failed at batch {error.batch_size}: {error.failure.error_type}: "
            f"{error.failure.message}"
        )
    if result.max_batch_size is None and not result.interrupted:
        raise NothingFitsError("batch size 1 does not fit on the device (or within the budget)")
    return result
