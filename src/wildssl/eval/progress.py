"""Progress bars on the long loops of evaluation (tqdm on stderr; stdout stays clean for ``--json``)."""

from __future__ import annotations

from collections.abc import Iterable


def progress_bar(iterable: Iterable, description: str, enabled: bool, total: int | None = None) -> Iterable:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` and stderr is a terminal; else unchanged."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI, pipes)
    return tqdm(iterable, desc=description, total=total, leave=False, disable=None)
