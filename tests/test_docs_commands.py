"""The docs cannot drift from the program: every ``sameguard ...`` command line in README.md and docs/*.md
is checked against the command line's own parser, and the cheap ones run for real at tiny sizes.

What is collected (:func:`doc_commands`):

* every line of a fenced code block that runs ``sameguard`` (also as ``.venv/bin/sameguard``, after
  ``nice``, or inside ``$(...)``), with ``\\`` continuations joined and ``# comments``, pipes and
  redirections cut off;
* every inline code span that starts with ``sameguard `` (prose mentions such as ``sameguard fit
  --target-fpr``).

What is checked:

1. every ``--flag`` of every line exists, spelled exactly, on its sub-command (argparse would accept an
   abbreviation; the docs must not rely on one), so a renamed or removed flag fails the suite;
2. every code-block line parses with ``sameguard.cli.build_parser()`` (types and choices included),
   except lines that elide arguments with ``...`` (``sameguard fit ... --out runs/same``: only their
   flags are checked). Documentation syntax is read as documentation: ``[--opt X]`` is optional text
   (kept), ``a|b`` is a choice (the first is used), and capitalised placeholders (``NAME``, ``URL``,
   ``DIR``, ``H``...) get a sample value (:data:`PLACEHOLDERS`);
3. :data:`RUN_FOR_REAL` names the commands that are run for real, in document order, in one
   temporary folder (so ``runs/victim`` made by one line is there for the next), with the extra
   arguments listed there appended to shrink them to seconds (argparse keeps the last value of a
   repeated option). A line is run only if its command is in that table, it has no documentation
   syntax (``[``, ``|``, ``<...>``) and no placeholder. Long-running commands (``serve``, ``bench``,
   ``demo``, ``bench-service``, ``same-study``, ``bench-attacks``) are parsed only; the tests of their
   modules run them at tiny sizes. To run a new kind of doc line for real, add its command here with
   the arguments that make it cheap.

The Python snippet of docs/service.md that writes ``shirt.png`` is run too.
"""

from __future__ import annotations

import functools
import io
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sameguard.cli import build_parser as _build_parser
from sameguard.cli import main

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def build_parser():
    """The CLI's parser, built once for the whole module (parsing does not change it)."""
    return _build_parser()

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Sample values for the placeholders the docs use in command lines.
PLACEHOLDERS = {"NAME": "alice", "URL": "sqlite:///sameguard.db", "DIR": "runs/victim", "H": "1", "N": "1",
                "TIME": "2h", "FILE": "rows.csv", "NAME=DIR": "same=runs/same", "KEY=VALUE": "epochs=1",
                "NAME=VALUE": "alpha=0.5", "PATH": "runs/x", "SPLIT": "test", "FPR": "0.01"}

#: Commands run for real, with the arguments appended to make them cheap (``None``: nothing to add).
#: The key is the command, "command sub-command", "fit:<detector kind>" or "attack:<attack name>":
#: only the detectors and attacks listed here run (others, e.g. with their own budget rules, are parsed only).
RUN_FOR_REAL: dict[str, list[str] | None] = {
    "train-victim": ["--epochs", "1", "--max-train-samples", "300", "--no-progress"],
    "fit:same": ["--preset", "tiny", "--mae-epochs", "1", "--aux-epochs", "1", "--max-train-samples", "300",
                 "--no-progress"],
    "fit:msp": None,
    "fit:energy": None,
    "fit:mahalanobis": ["--max-train-samples", "300"],
    "fit:same-conv-ae": ["--preset", "tiny", "--param", "ae_epochs=1", "--aux-epochs", "1",
                         "--max-train-samples", "300", "--no-progress"],
    "fit:outlier-exposure": ["--param", "epochs=1", "--max-train-samples", "300", "--no-progress"],
    "calibrate": ["--no-progress"],
    "score": None,
    "attack:knockoff": ["--budget", "40", "--epochs", "1", "--no-progress"],
    "attack:jbda": ["--budget", "40", "--epochs", "1", "--no-progress"],
    "attack:jbda-tr": ["--budget", "40", "--epochs", "1", "--no-progress"],
    "alarms calibrate": None,
    "keys create": None,
    "keys list": None,
    "audit": None,
    "info": None,
}

#: Tokens that end the sameguard part of a shell line.
_SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}
_DOC_SYNTAX = re.compile(r"[\[\]|]|<[^>]*>|\.\.\.")


@dataclass(frozen=True)
class DocCommand:
    """One ``sameguard`` command line of the docs: where it is, its raw text, and its argument tokens."""

    where: str
    text: str
    inline: bool

    @property
    def tokens(self) -> list[str]:
        """The arguments after ``sameguard``, documentation syntax resolved (see the module docstring)."""
        out: list[str] = []
        for token in shlex.split(self.text.replace("[", " ").replace("]", " "), comments=True):
            if token in _SHELL_STOP:
                break
            if token == "...":
                continue
            token = token.split("|")[0] if "|" in token and not token.startswith(("sqlite", "postgres")) else token
            out.append(PLACEHOLDERS.get(token, token))
        return out[out.index("sameguard") + 1:] if "sameguard" in out else out[1:]

    @property
    def runnable(self) -> bool:
        """No documentation syntax or placeholder: the line means exactly what it says."""
        text = self.text.split("#", 1)[0]
        return not self.inline and not _DOC_SYNTAX.search(text) and not any(
            t in PLACEHOLDERS for t in shlex.split(text))


def _code_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of the fenced code blocks, with ``\\`` continuations joined."""
    lines, in_block, joined, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if not joined:
            start = number
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        lines.append((start, joined + line))
        joined = ""
    return lines


def _sameguard_part(line: str) -> str | None:
    """The ``sameguard ...`` command a shell line runs, or ``None``."""
    inner = re.search(r"\$\(((?:\S*/)?sameguard [^)]*)\)", line)
    if inner:
        return inner.group(1)
    match = re.match(r"^\s*(?:\$\s+)?(?:nice(?:\s+-n\s*\d+)?\s+)?((?:\S*/)?sameguard\s.*)$", line)
    return match.group(1) if match else None


def doc_commands() -> list[DocCommand]:
    """Every ``sameguard`` command line of the docs, in order (README first)."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for number, line in _code_lines(text):
            command = _sameguard_part(line)
            if command is not None:
                found.append(DocCommand(f"{path.name}:{number}", command.replace("\\", " "), inline=False))
        for match in re.finditer(r"`((?:\.venv/bin/)?sameguard [^`]+)`", text):
            number = text.count("\n", 0, match.start()) + 1
            found.append(DocCommand(f"{path.name}:{number}", " ".join(match.group(1).split()), inline=True))
    return found


COMMANDS = doc_commands()


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _resolve(tokens: list[str]):
    """``(sub-parser, sub-command path, the sub-command's own tokens, unknown options before the path)``.

    Options given before the sub-command (``sameguard --require-authenticated-artifacts score ...``)
    are checked against the parser they are given to.
    """
    parser, path, unknown = build_parser(), [], []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        choices = _subparsers(parser)
        if choices and token.startswith("-"):  # an option of this level, before its sub-command
            action = parser._option_string_actions.get(token.split("=", 1)[0])
            if action is None:
                unknown.append(token.split("=", 1)[0])
            i += 1 if action is None or action.nargs == 0 or "=" in token else 2
            continue
        if not choices or token not in choices:
            break
        parser, path = choices[token], path + [token]
        i += 1
    return parser, path, tokens[i:], unknown


def test_the_docs_have_command_lines():
    assert len([c for c in COMMANDS if not c.inline]) >= 20
    assert {"train-victim", "fit", "score", "serve", "audit", "info"} <= {c.tokens[0] for c in COMMANDS if c.tokens}


def unknown_flags(command: DocCommand) -> list[str]:
    """The flags of ``command`` that its sub-command does not have, spelled exactly (no abbreviations)."""
    parser, path, rest, unknown = _resolve(command.tokens)
    assert path, f"{command.where}: {command.text!r} names no sameguard command"
    known = set(parser._option_string_actions)
    return unknown + [token.split("=", 1)[0] for token in rest
                      if token.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?(e-?\d+)?", token)
                      and token.split("=", 1)[0] not in known]


def test_a_renamed_or_abbreviated_flag_is_caught():
    assert unknown_flags(DocCommand("x", "sameguard bench-attacks --victim v --budget 10", False)) == ["--budget"]
    assert unknown_flags(DocCommand("x", "sameguard keys create --name a --quiet", True)) == []
    assert unknown_flags(DocCommand("x", "sameguard keys list --quiet", True)) == ["--quiet"]
    assert unknown_flags(DocCommand("x", "sameguard --no-such-flag score --victim v", True)) == ["--no-such-flag"]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_every_flag_in_the_docs_exists(command):
    parser, path, _, _ = _resolve(command.tokens)
    unknown = unknown_flags(command)
    assert not unknown, (f"{command.where}: {' '.join(path)} has no option {', '.join(unknown)} (in {command.text!r}); "
                         f"it has {sorted(k for k in parser._option_string_actions if k.startswith('--'))}")


#: Code lines that are whole commands: ``...`` inside ``[optional]`` text is fine, elsewhere it elides arguments.
COMPLETE = [c for c in COMMANDS if not c.inline and "..." not in re.sub(r"\[[^\]]*\]", "", c.text.split("#", 1)[0])]


@pytest.mark.parametrize("command", COMPLETE, ids=[c.where for c in COMPLETE])
def test_every_code_line_parses(command):
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            build_parser().parse_args(command.tokens)
    except SystemExit as exc:
        assert exc.code == 0, f"{command.where}: {command.text!r} does not parse: {err.getvalue().strip()}"


def _run_key(tokens: list[str]) -> str:
    if tokens[0] == "fit":
        kind = tokens[tokens.index("--detector-kind") + 1] if "--detector-kind" in tokens else "same"
        return f"fit:{kind}"
    if tokens[0] in ("keys", "alarms") and len(tokens) > 1:
        return f"{tokens[0]} {tokens[1]}"
    if tokens[0] == "attack" and len(tokens) > 1:
        return f"attack:{tokens[1]}"
    return tokens[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch, fmnist_small):
    """A folder with what the docs' command lines read: benign.npy and queries/ (PNGs)."""
    from sameguard.imagefiles import write_pngs

    _, test = fmnist_small
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "benign.npy", test.images[:200].numpy())
    write_pngs(test.images[200:206], tmp_path / "queries")
    return tmp_path


def test_cheap_doc_commands_run_for_real(workdir, capsys):
    ran, failed = [], []
    for command in COMMANDS:
        tokens = command.tokens
        if not command.runnable or not tokens or _run_key(tokens) not in RUN_FOR_REAL:
            continue
        argv = tokens + (RUN_FOR_REAL[_run_key(tokens)] or [])
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(argv)
        err = capsys.readouterr().err
        ran.append(_run_key(tokens))
        if code != 0:
            failed.append(f"{command.where}: {command.text!r} exited {code}: {err.strip()[-500:]}")
    assert not failed, "\n".join(failed)
    # The README's walk-through and the service quick start are among what ran.
    assert {"train-victim", "fit:same", "calibrate", "score", "attack:jbda", "keys create", "audit", "info",
            "alarms calibrate"} <= set(ran), sorted(set(ran))


def test_the_shirt_snippet_of_the_service_docs_writes_a_png(workdir):
    from PIL import Image

    text = (ROOT / "docs" / "service.md").read_text()
    snippet = re.search(r"python - <<'PY'\n(.*?)\nPY\n", text, flags=re.DOTALL).group(1)
    exec(compile(snippet, "docs/service.md", "exec"), {})  # noqa: S102 - the documented snippet, run as written
    with Image.open(workdir / "shirt.png") as img:
        assert img.format == "PNG" and img.size == (28, 28) and img.mode == "L"
