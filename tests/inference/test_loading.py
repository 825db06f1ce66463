"""What generation and serving open: every kind of checkpoint gives its tokenizer, EOS and chat template;
the others are clear errors. (The weights' layouts are tests/platform/test_checkpoint.py's.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raymoe.actors.driver import GraphTrainer
from raymoe.platform.checkpoint.layout import TOKENIZER_FILE, CheckpointError
from raymoe.platform.checkpoint.reader import load_model
from raymoe.platform.config import config_to_dict, load_config
from raymoe.platform.inference.loading import DEFAULT_CHAT_TEMPLATE, ServedCheckpoint, open_served
from raymoe.platform.train.trainer import LocalTrainer

from hf_reference import train_tokenizer

TEXT = "def f(x):\n    return x + 1\n"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / TOKENIZER_FILE)


def _assert_text_ready(served: ServedCheckpoint, tokenizer_file: Path, eos: int | None) -> None:
    """The checkpoint's tokenizer (the one it was saved with), EOS and the default chat template."""
    from tokenizers import Tokenizer

    assert served.tokenizer.encode(TEXT).ids == Tokenizer.from_file(str(tokenizer_file)).encode(TEXT).ids
    assert served.eos_token_id == eos
    assert served.chat_template == DEFAULT_CHAT_TEMPLATE


def test_a_local_trainer_checkpoint_and_its_training_output(tmp_path: Path, tokenizer_file: Path) -> None:
    """A checkpoint of LocalTrainer.save_checkpoint opens as itself; its training output as its latest one."""
    cfg = load_config("tiny", ["tracking.enabled=false"])
    trainer = LocalTrainer(cfg)
    state = {"config": config_to_dict(cfg)}
    first = trainer.save_checkpoint(str(tmp_path / "run"), state, [str(tokenizer_file)])
    rows = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    trainer.train_step([(rows[:, :-1], rows[:, 1:])])
    latest = trainer.save_checkpoint(str(tmp_path / "run"), state, [str(tokenizer_file)])
    assert first.endswith("step_00000000") and latest.endswith("step_00000001")

    for location, expected in [(first, first), (str(tmp_path / "run"), latest)]:
        served = open_served(location)
        assert served.location == expected and served.model_config == cfg.model
        _assert_text_ready(served, tokenizer_file, cfg.model.eos_token_id)
    # the output served is the trained one: its weights are the trainer's after the step
    head = load_model(served.reader).lm_head.weight
    assert torch.equal(head, trainer.model.lm_head.weight)


def test_a_graph_training_output_opens_and_loads_with_its_weights(tmp_path: Path, tokenizer_file: Path) -> None:
    """The actor graph's checkpoint (one file per actor, what `make demo` writes), found from the training output."""
    cfg = load_config("tiny", ["parallel.pp=2", "parallel.ep=2"])
    graph = GraphTrainer(cfg, in_process=True)
    try:
        expected = graph.full_state_dict()
        graph.save_checkpoint(str(tmp_path / "run"), {"config": config_to_dict(cfg)}, [str(tokenizer_file)])
    finally:
        graph.shutdown()
    served = open_served(str(tmp_path / "run"))
    assert served.location.endswith("step_00000000")
    _assert_text_ready(served, tokenizer_file, cfg.model.eos_token_id)
    got = load_model(served.reader).state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_a_hugging_face_checkpoint(served_checkpoint: str, tmp_path: Path) -> None:
    served = open_served(served_checkpoint)
    assert served.location == served_checkpoint and served.model_config.num_nextn_predict_layers == 1
    _assert_text_ready(served, Path(served_checkpoint, TOKENIZER_FILE), 1)  # generation_config.json's
    model = load_model(served.reader, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.moe_layers()[0].gate.weight.dtype == torch.float32  # the router stays float32
    # a chat template in tokenizer_config.json, and an EOS list in generation_config.json (its first)
    other = tmp_path / "templated"
    shutil.copytree(served_checkpoint, other)
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    served = open_served(str(other))
    assert served.chat_template == "{{ messages[0]['content'] }}" and served.eos_token_id == 7


def _word_level_tokenizer(path: Path, size: int) -> Path:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(str(path))
    return path


def test_errors_name_the_checkpoint_and_what_is_wrong(served_checkpoint: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(served_checkpoint, broken)
    (broken / TOKENIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {broken} has no tokenizer.json"):
        open_served(str(broken))
    headless = open_served(str(broken), tokenizer_required=False)  # token ids only (raymoe generate --ids)
    assert headless.tokenizer is None and headless.eos_token_id == 1

    (broken / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"cannot read tokenizer.json of {broken}"):
        open_served(str(broken))
    _word_level_tokenizer(broken / TOKENIZER_FILE, 600)
    with pytest.raises(CheckpointError, match="has 600 tokens, more than the model's vocab_size 512"):
        open_served(str(broken))

    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'missing'} does not exist"):
        open_served(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty'} is not a checkpoint: neither a training"):
        open_served(str(tmp_path / "empty"))
