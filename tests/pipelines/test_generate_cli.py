"""``raymoe generate``: on a checkpoint written by transformers, and on a training output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raymoe.pipelines.cli import main
from raymoe.platform.checkpoint import latest_checkpoint, load_model
from raymoe.platform.checkpoint.layout import TOKENIZER_FILE
from raymoe.platform.config import load_config

from conftest import tiny_variant
from hf_reference import save_hf_checkpoint, train_tokenizer

NEW_TOKENS = 5
INIT_STD = 0.1  # larger than the presets' 0.02: greedy choices are far from ties
JSON_KEYS = {"prompt_ids", "generated_ids", "text", "tokens_per_s"}
Checkpoint = tuple[Path, torch.nn.Module]  # a transformers-written checkpoint and transformers' model of it


def _generate(argv: list[str]) -> int:
    """``raymoe generate ARGV`` in this process, through the command line's entry point."""
    return main(["generate", *argv])


@torch.no_grad()
def _greedy_without_cache(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """The reference: the whole sequence through the training forward for every new token."""
    seq = torch.tensor([prompt])
    for _ in range(n):
        seq = torch.cat((seq, model(seq)[:, -1:].argmax(-1)), dim=1)
    return seq[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A transformers-saved tiny checkpoint (its config declares an MTP module the files lack)."""
    path = tmp_path_factory.mktemp("ckpt")
    hf = save_hf_checkpoint(tiny_variant(initializer_range=INIT_STD), path)
    return path, hf


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt_tok") / "ckpt"
    shutil.copytree(checkpoint[0], path)
    train_tokenizer(path / TOKENIZER_FILE)
    return path


@pytest.fixture(scope="module")
def training_output(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of a short local pretraining (its checkpoints carry the data's tokenizer and an MTP module)."""
    from raymoe.platform.train.loop import pretrain

    cfg = load_config("tiny", ["train.steps=2", "tracking.enabled=false", f"model.initializer_range={INIT_STD}"])
    out = tmp_path_factory.mktemp("pretrained")
    pretrain(cfg, tiny_data, out, progress=False)
    return out


def test_prompt_ids_json_matches_transformers(checkpoint: Checkpoint, capsys: pytest.CaptureFixture) -> None:
    path, hf = checkpoint
    prompt = [5, 17, 42]
    rc = _generate(
        ["--checkpoint", str(path), "--prompt-ids", "5,17,42", "--max-new-tokens", str(NEW_TOKENS)]
        + ["--json", "--ignore-eos"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out.keys() == JSON_KEYS
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


def test_sampling_bf16_plain_output(checkpoint: Checkpoint, capsys: pytest.CaptureFixture) -> None:
    argv = ["--checkpoint", str(checkpoint[0]), "--prompt-ids", "5,17", "--max-new-tokens", "4", "--ignore-eos"]
    argv += ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3", "--dtype", "bf16"]
    assert _generate(argv) == 0
    first = capsys.readouterr().out.split()
    assert first[:2] == ["5", "17"] and len(first) == 6  # no tokenizer: prompt and new ids
    assert _generate(argv) == 0
    assert capsys.readouterr().out.split() == first  # seeded


def test_text_prompt_with_tokenizer(checkpoint_with_tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--checkpoint", str(checkpoint_with_tokenizer), "--prompt", "def f", "--max-new-tokens", "6"]
    assert _generate(argv) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert _generate([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith("def f")
    assert 1 <= len(out["generated_ids"]) <= 6


def test_a_training_output_generates(training_output: Path, capsys: pytest.CaptureFixture) -> None:
    from tokenizers import Tokenizer

    latest = latest_checkpoint(str(training_output))
    tokenizer = Tokenizer.from_file(str(Path(latest, TOKENIZER_FILE)))
    prompt = tokenizer.encode("def f(x):").ids
    argv = ["--checkpoint", str(training_output), "--prompt", "def f(x):", "--max-new-tokens", "6", "--ignore-eos"]

    assert _generate([*argv, "--json"]) == 0  # speculative: the checkpoint has its MTP module
    out = json.loads(capsys.readouterr().out)
    assert _generate([*argv, "--json", "--no-speculative"]) == 0
    plain = json.loads(capsys.readouterr().out)

    assert out["prompt_ids"] == prompt
    assert out["generated_ids"] == plain["generated_ids"] == _greedy_without_cache(load_model(latest), prompt, 6)
    assert out["text"] == tokenizer.decode(prompt + out["generated_ids"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt-ids", "5,x,42"], "--prompt-ids: 'x' is not an integer token id"),
        (["--prompt-ids", "5,512"], "512 is outside the model's vocabulary (ids must be in 0..511)"),
        (["--prompt-ids", "-1"], "-1 is outside the model's vocabulary"),
        (["--prompt", "def f"], "has no tokenizer.json"),
        (["--prompt-ids", "5", "--max-new-tokens", "600"], "exceed the model's context of 512 tokens"),
        (["--prompt-ids", "5", "--max-new-tokens", "0"], "max_tokens must be a positive integer, got 0"),
        (["--prompt-ids", "5", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt-ids", "5", "--top-k", "-1"], "top_k must be a non-negative integer"),
        (["--prompt-ids", "5", "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    ],
)
def test_bad_inputs_exit_2_naming_the_problem(
    checkpoint: Checkpoint,
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture,
) -> None:
    assert _generate(["--checkpoint", str(checkpoint[0]), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.startswith("raymoe generate: ") and captured.err.count("\n") == 1
    assert captured.out == ""


def test_a_missing_checkpoint_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _generate(["--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"raymoe generate: checkpoint {tmp_path / 'nope'} does not exist\n"
    assert captured.out == ""
    assert _generate(["--checkpoint", str(tmp_path), "--prompt-ids", "5"]) == 2  # a folder, but no checkpoint
    err = capsys.readouterr().err
    assert err.startswith(f"raymoe generate: {tmp_path} is not a checkpoint") and err.count("\n") == 1


def test_prompt_and_prompt_ids_are_exclusive(checkpoint: Checkpoint) -> None:
    with pytest.raises(SystemExit) as exc:
        _generate(["--checkpoint", str(checkpoint[0]), "--prompt", "a", "--prompt-ids", "5"])
    assert exc.value.code == 2
