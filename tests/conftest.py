"""Shared fixtures: real data shipped with the tests, a tiny victim and a tiny fitted SAME detector.

Data. The tests run on a fixed subset of Fashion-MNIST shipped in ``tests/fixtures/fashion-mnist-small``
(3000 training and 1000 test images, MIT licence, see the README there), loaded through the real
loader. For the whole session ``SAMEGUARD_DATA_DIR`` points there, so code that loads
``"fashion-mnist"`` by name (the CLI, the benchmark runner, the service) finds it too. Tests that
need the full dataset ask for ``fmnist_full_dir`` and are skipped where it is not installed; the
run then ends with a line saying which data was missing and how many tests it skipped.

Set ``SAMEGUARD_TEST_HIDE_SYSTEM_DATA=1`` to run the suite as on a fresh machine: Debian's
Fashion-MNIST directory is then hidden from the loader.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from sameguard.data import fashion_mnist, files, load_dataset
from sameguard.detectors import SAMEDetector
from sameguard.victim import train_victim

# Real Redis / PostgreSQL for the tests that need them (skipped when absent, failing under CI=true).
from _servers import postgres_url, redis_server  # noqa: E402,F401

# Tiny models train fastest on one thread, and a shared 2-core machine makes two threads crawl.
torch.set_num_threads(1)

#: The Fashion-MNIST subset shipped with the tests.
FMNIST_SMALL = Path(__file__).parent / "fixtures" / "fashion-mnist-small"
#: Environment variable that hides system-wide data (Debian's Fashion-MNIST) from the tests.
HIDE_SYSTEM_DATA_ENV = "SAMEGUARD_TEST_HIDE_SYSTEM_DATA"
#: Skip reasons for missing data start with this, so the summary at the end can count them.
MISSING_DATA = "missing data: "
#: Older skip reasons that also mean missing data ("Fashion-MNIST is not installed (...)").
_MISSING_PATTERNS = (re.compile(re.escape(MISSING_DATA) + r"(.+)"), re.compile(r"(.+?) is not installed"))

_saved_env: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Point ``SAMEGUARD_DATA_DIR`` at the shipped subset; hide Debian's data when asked to."""
    _saved_env[files.DATA_DIR_ENV] = os.environ.get(files.DATA_DIR_ENV)
    os.environ[files.DATA_DIR_ENV] = str(FMNIST_SMALL)
    if os.environ.get(HIDE_SYSTEM_DATA_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        fashion_mnist.DEBIAN_DIR = Path("/nonexistent/hidden-by-" + HIDE_SYSTEM_DATA_ENV)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line at the end when tests were skipped because data was missing: which data, how many tests."""
    missing: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report)
        for pattern in _MISSING_PATTERNS:
            match = pattern.search(reason)
            if match:
                missing[match.group(1).strip()] += 1
                break
    if missing:
        total = sum(missing.values())
        parts = "; ".join(f"{what}: {n}" for what, n in missing.most_common())
        terminalreporter.write_line(f"{total} test(s) skipped because data was missing ({parts})", yellow=True)


@pytest.fixture(scope="session")
def fmnist_full_dir() -> Path:
    """The directory of the full Fashion-MNIST files (Debian's), or a skip where it is not installed."""
    directory = Path(fashion_mnist.DEBIAN_DIR)
    stems = [stem for pair in fashion_mnist.FILES.values() for stem in pair]
    if not all(files.find_file(directory, stem) for stem in stems):
        pytest.skip(f"{MISSING_DATA}the full Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    return directory


@pytest.fixture(scope="session")
def fmnist_small():
    """(train, test): the 3000 training and 1000 test Fashion-MNIST images shipped with the tests.

    Loaded with the real loader from ``tests/fixtures/fashion-mnist-small`` (files checked against
    its manifest); they are the images ``take(3000, seed=0)`` / ``take(1000, seed=0)`` draws from
    the full splits.
    """
    train = load_dataset("fashion-mnist", "train", data_dir=FMNIST_SMALL)
    test = load_dataset("fashion-mnist", "test", data_dir=FMNIST_SMALL)
    return train, test


@pytest.fixture(scope="session")
def tiny_victim(fmnist_small):
    train, test = fmnist_small
    return train_victim(train, test, arch="lenet5", epochs=2, seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_same(tiny_victim, fmnist_small):
    """A SAME detector with the ``tiny`` preset fitted on 2500 images; 500 held out for calibration."""
    train, _ = fmnist_small
    fit_part, held_out = train.split_off(500 / len(train), seed=0)
    detector = SAMEDetector.from_preset("tiny", seed=0, progress=False).fit(tiny_victim, fit_part)
    detector.calibrate(held_out.images, 0.05)
    return detector


@pytest.fixture
def noise():
    g = torch.Generator().manual_seed(123)
    return torch.rand(200, 1, 28, 28, generator=g) * 2 - 1
