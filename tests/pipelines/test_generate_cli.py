"""``raymoe generate`` on a tiny checkpoint written by transformers."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from raymoe.pipelines import generate as generate_cli

from conftest import tiny_variant
from hf_reference import save_hf_checkpoint, train_tokenizer

NEW_TOKENS = 5
INIT_STD = 0.1


def _run(argv: list[str]) -> int:
    """Parse and run ``raymoe generate ARGV`` as ``raymoe.pipelines.cli.main`` does."""
    parser = argparse.ArgumentParser(prog="raymoe")
    generate_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A transformers-saved tiny checkpoint (its config declares an MTP module the files lack)."""
    path = tmp_path_factory.mktemp("ckpt")
    hf = save_hf_checkpoint(tiny_variant(initializer_range=INIT_STD), path)
    return path, hf


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(checkpoint: tuple[Path, torch.nn.Module], tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt_tok") / "ckpt"
    shutil.copytree(checkpoint[0], path)
    train_tokenizer(path / generate_cli.TOKENIZER_FILE)
    return path


def test_prompt_ids_json_matches_transformers(checkpoint, capsys: pytest.CaptureFixture) -> None:
    path, hf = checkpoint
    prompt = [5, 17, 42]
    rc = _run(
        ["--checkpoint", str(path), "--prompt-ids", "5,17,42", "--max-new-tokens", str(NEW_TOKENS)]
        + ["--json", "--ignore-eos"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == prompt
    assert len(out["generated_ids"]) == NEW_TOKENS
    assert out["text"] is None  # no tokenizer.json
    assert out["tokens_per_s"] > 0
    ids = torch.tensor([prompt])
    expected = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert out["generated_ids"] == expected


def test_sampling_bf16_plain_output(checkpoint, capsys: pytest.CaptureFixture) -> None:
    argv = ["--checkpoint", str(checkpoint[0]), "--prompt-ids", "5,17", "--max-new-tokens", "4", "--ignore-eos"]
    argv += ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--dtype", "bf16"]
    assert _run(argv) == 0
    first = capsys.readouterr().out.split()
    assert first[:2] == ["5", "17"] and len(first) == 6  # no tokenizer: prompt and new ids
    assert _run(argv) == 0
    assert capsys.readouterr().out.split() == first  # seeded


def test_text_prompt_with_tokenizer(checkpoint_with_tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--checkpoint", str(checkpoint_with_tokenizer), "--prompt", "def f", "--max-new-tokens", "6"]
    assert _run(argv) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert _run([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith("def f")
    assert 1 <= len(out["generated_ids"]) <= 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt-ids", "5,x,42"], "'x' is not an integer"),
        (["--prompt-ids", "5,512"], "512 is outside the model's vocabulary"),
        (["--prompt-ids", "-1"], "-1 is outside the model's vocabulary"),
        (["--prompt", "def f"], "has no tokenizer.json; pass --prompt-ids"),
        (["--prompt-ids", "5", "--max-new-tokens", "600"], "max_position_embeddings (512)"),
        (["--prompt-ids", "5", "--top-p", "0"], "top_p"),
        (["--prompt-ids", "5", "--device", "nonsense"], "--device 'nonsense'"),
    ],
)
def test_bad_inputs_exit_2_naming_the_problem(
    checkpoint, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert _run(["--checkpoint", str(checkpoint[0]), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _run(["--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "5"]) == 2
    assert "nope is not a directory" in capsys.readouterr().err
    assert _run(["--checkpoint", str(tmp_path), "--prompt-ids", "5"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_prompt_and_prompt_ids_are_exclusive(checkpoint) -> None:
    with pytest.raises(SystemExit) as exc:
        _run(["--checkpoint", str(checkpoint[0]), "--prompt", "a", "--prompt-ids", "5"])
    assert exc.value.code == 2
