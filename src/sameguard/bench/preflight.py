"""Before a benchmark starts: every dataset split its config needs can be loaded.

A profile names data in four places: ``datasets`` (the victims' data, train and test splits), each
attack's ``proxy`` and ``seed_data`` (train splits), and each detector's ``outlier_data`` (the test
split, :data:`OUTLIER_SPLIT`). :func:`required_data` lists them and
:func:`check_data` loads each one (the loaders verify the files and cache the arrays in-process, so
the run that follows reads nothing twice) and reports **every** missing one in one error, before
any victim is trained: the ``paper`` profile with MNIST present and EMNIST missing fails in seconds,
not hours into a GPU run.
"""

from __future__ import annotations

import logging

from ..api import DatasetNotFoundError
from .config import ATTACKER_HALF, BenchConfig

logger = logging.getLogger(__name__)

__all__ = ["check_data", "required_data"]

#: The split of ``outlier_data`` the runner loads.
OUTLIER_SPLIT = "test"


def required_data(config: BenchConfig) -> list[tuple[str, str, str]]:
    """``(dataset, split, what needs it)`` for every split the benchmark loads, without repeats, in order."""
    needed: dict[tuple[str, str], str] = {}

    def need(name: str | None, split: str, why: str) -> None:
        if name is not None and name != ATTACKER_HALF:
            needed.setdefault((name, split), why)

    for name in config.datasets:
        need(name, "train", "the victim")
        need(name, "test", "the victim's test split")
    for attack in config.attacks:
        need(attack.proxy, "train", f"attack {attack.label!r} (proxy)")
        need(attack.seed_data, "train", f"attack {attack.label!r} (seed data)")
    for detector in config.detectors:
        need(detector.outlier_data, OUTLIER_SPLIT, f"detector {detector.label!r} (outlier data)")
    return [(name, split, why) for (name, split), why in needed.items()]


def check_data(config: BenchConfig, *, data_dir: str | None = None, download: bool = False) -> None:
    """Load every split :func:`required_data` lists; raise one error naming all that are missing.

    Raises:
        DatasetNotFoundError: one or more splits cannot be found (the message names each, what needs
            it, and how to provide it).
    """
    from ..data import load_dataset

    missing: list[str] = []
    for name, split, why in required_data(config):
        try:
            load_dataset(name, split, data_dir=data_dir, download=download)
        except DatasetNotFoundError as exc:
            logger.info("%s %s split is missing: %s", name, split, exc)
            missing.append(f"{name} ({split} split, for {why})")
    if missing:
        raise DatasetNotFoundError(
            f"The benchmark config {config.source or config.name} needs data that was not found: "
            f"{'; '.join(missing)}. Nothing was run. Put the files in a folder given by --data-dir (or "
            "$SAMEGUARD_DATA_DIR), in a subfolder per dataset (e.g. <dir>/mnist/, <dir>/emnist/); "
            "'sameguard bench --help' and the README list the formats.")
