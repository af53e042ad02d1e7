"""``bench/profiles/FORMAT.md`` documents every key the config parser accepts, with the code's defaults.

The accepted keys are read from the parser itself (the "allowed" list of its unknown-key error),
so a key added to ``sameguard.bench.config`` without a line in the reference fails here.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from importlib import resources

import pytest

from sameguard.bench.adaptive_study import KeySweepSpec
from sameguard.bench.config import AlarmSpec, AttackSpec, DetectorSpec, VictimSpec, parse_config

DOC = resources.files("sameguard.bench.profiles").joinpath("FORMAT.md").read_text()

BASE = {"name": "t", "datasets": ["digits"], "scored_queries": 10,
        "attacks": [{"name": "jbda", "budget": 10}], "detectors": [{"name": "msp", "label": "MSP"}]}


def _section(title: str) -> dict[str, str]:
    """``{key: default cell}`` of the table under the heading ``## title``."""
    text = DOC.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]+) \|", text, flags=re.MULTILINE)
    return {key: default.strip() for key, default in rows}


def _allowed(raw: dict) -> set[str]:
    with pytest.raises(ValueError) as exc:
        parse_config(raw)
    listed = re.search(r"allowed: \[?([^\]]*?)\]?\.?$", str(exc.value)).group(1)  # "[...]" or "a, b, c."
    return set(listed.replace("'", "").split(", "))


SECTIONS = {
    "Top level": lambda: dict(BASE, zzz=1),
    "`[victim]`": lambda: dict(BASE, victim={"zzz": 1}),
    "`[[attacks]]`": lambda: dict(BASE, attacks=[{"name": "jbda", "budget": 10, "zzz": 1}]),
    "`[[detectors]]`": lambda: dict(BASE, detectors=[{"name": "msp", "zzz": 1}]),
    "`[alarms]`": lambda: dict(BASE, alarms={"detectors": ["MSP"], "zzz": 1}),
    "`[key_sweep]`": lambda: dict(BASE, alarms={"detectors": ["MSP"]}, key_sweep={"zzz": 1}),
}


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_every_accepted_key_is_documented(title):
    documented = set(_section(title))
    accepted = _allowed(SECTIONS[title]())
    assert accepted <= documented, f"undocumented keys in {title}: {sorted(accepted - documented)}"
    assert documented <= accepted, f"documented keys the parser refuses in {title}: {sorted(documented - accepted)}"


@pytest.mark.parametrize("title, spec", [("`[victim]`", VictimSpec), ("`[[attacks]]`", AttackSpec),
                                         ("`[[detectors]]`", DetectorSpec), ("`[alarms]`", AlarmSpec),
                                         ("`[key_sweep]`", KeySweepSpec)])
def test_documented_defaults_are_the_codes(title, spec):
    rows = _section(title)
    for field in dataclasses.fields(spec):
        if field.name not in rows:
            continue
        cell = rows[field.name]
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            assert cell == "required" or not cell.startswith("`"), f"{title} {field.name}: no default in the code"
            continue
        if default is None:
            assert cell.startswith(("none", "the ", "absent")), (title, field.name)
            continue
        value = tomllib.loads(f"v = {cell.strip('`')}")["v"]
        expected = list(default) if isinstance(default, tuple) else default
        assert value == expected, f"{title} {field.name}: documented {cell}, the code says {default!r}"


def test_bundled_profiles_are_valid_and_beside_the_reference():
    from sameguard.bench.config import PROFILES, load_config

    for name in PROFILES:
        assert load_config(name).name == name
        assert f"`{name}.toml`" in DOC
