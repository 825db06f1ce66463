"""The ``raymoe`` command's dispatch: a named subcommand imports its own module alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raymoe.pipelines import cli


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["info", "tiny"], "info"),
        (["--log-level", "DEBUG", "bench", "model"], "bench"),
        (["prepare-data", "--help"], "prepare-data"),
        (["--help"], None),
        (["--log-level=DEBUG", "info"], None),  # the full parser reads the joined form
        (["bogus"], None),  # the full parser names the choices
        ([], None),
    ],
)
def test_named_command(argv: list[str], want: str | None) -> None:
    assert cli._named_command(argv) == want


def test_a_named_subcommand_does_not_import_serve() -> None:
    """``raymoe info`` (or ``bench``) runs without Ray Serve and FastAPI imported: a GPU image lacks them."""
    code = (
        "import sys; from raymoe.pipelines import cli; rc = cli.main(['info', 'tiny', '--json']);"
        "assert rc == 0, rc; bad = [m for m in ('raymoe.pipelines.serve', 'fastapi') if m in sys.modules];"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_full_parser_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in cli.SUBCOMMANDS)


def test_an_unknown_subcommand_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
