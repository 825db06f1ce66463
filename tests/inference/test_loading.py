"""What a replica loads: every kind of checkpoint ``raymoe serve`` takes, and clear errors for the others."""

from __future__ import annotations

import shutil

import pytest
import torch

from raymoe.actors.driver import GraphTrainer
from raymoe.platform.checkpoint.hf import CheckpointError
from raymoe.platform.config import config_to_dict, load_config
from raymoe.platform.inference.loading import DEFAULT_CHAT_TEMPLATE, load_served_model

from hf_reference import train_tokenizer


def test_a_graph_training_output_loads_with_its_weights(tmp_path) -> None:
    """The actor graph's sharded checkpoint (what `make demo` writes), found from the training output."""
    cfg = load_config("tiny", ["parallel.pp=2", "parallel.ep=2"])
    graph = GraphTrainer(cfg, in_process=True)
    try:
        expected = graph.full_state_dict()
        tokenizer = train_tokenizer(tmp_path / "tokenizer.json")
        graph.save_checkpoint(str(tmp_path / "run"), {"config": config_to_dict(cfg)}, [tokenizer])  # as pretrain
    finally:
        graph.shutdown()
    served = load_served_model(str(tmp_path / "run"), torch.float32)
    assert served.checkpoint.endswith("step_00000000") and served.chat_template == DEFAULT_CHAT_TEMPLATE
    got = served.model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_hf_checkpoint_and_errors(served_checkpoint, tmp_path) -> None:
    served = load_served_model(str(served_checkpoint), torch.bfloat16)
    assert served.model.lm_head.weight.dtype == torch.bfloat16
    assert served.model.moe_layers()[0].gate.weight.dtype == torch.float32  # the router stays float32
    assert served.model.cfg.num_nextn_predict_layers == 1
    no_tokenizer = tmp_path / "no-tok"
    shutil.copytree(served_checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_served_model(str(no_tokenizer))
    with pytest.raises(CheckpointError, match="neither a training checkpoint nor a training output"):
        load_served_model(str(tmp_path / "missing"))
