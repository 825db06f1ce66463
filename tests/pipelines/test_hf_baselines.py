"""transformers' baselines for ``raymoe bench serve``: every configuration is the same greedy math as plain
``generate``, rows carry their runs and median, and a configuration that cannot run is a row with an error.
Timings are never asserted."""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from raymoe.pipelines.benchmarks.hf_baselines import (
    CONFIG_LABELS,
    DEFAULT_CONFIGS,
    MIN_REPEATS,
    best_baseline,
    export_for_transformers,
    format_rows,
    measure_transformers,
    parse_config,
)
from raymoe.platform.config import load_config

from hf_reference import save_hf_checkpoint

PROMPT = [5, 17, 42, 99, 5, 17, 42, 7, 300, 12, 5, 17]  # repeats, so that prompt lookup finds candidates
NEW_TOKENS = 6
EAGER_CONFIGS = ["grouped_mm", "eager", "batched_mm", "grouped_mm+static", "grouped_mm+prompt_lookup"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("hf-baselines") / "tiny"
    save_hf_checkpoint(load_config("tiny").model, path)
    return str(path)


@pytest.fixture(scope="module")
def plain_generate_tokens(hf_dir: str) -> list[int]:
    """transformers' plain ``generate``, as a user calls it: default experts and cache, float32."""
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


def _assert_ran_like_generate(rows: dict, names: list[str], reference: list[int]) -> None:
    for name in names:
        row = rows[name]
        assert row["error"] is None, f"{name}: {row['error']}"
        assert row["tokens"] == reference, name
        assert len(row["runs_tokens_per_s"]) == MIN_REPEATS
        assert row["tokens_per_s"] == statistics.median(row["runs_tokens_per_s"])
        assert row["tokens_per_s"] == sorted(row["runs_tokens_per_s"])[1]  # three runs: the middle one
        assert row["setup_s"] > 0 and row["load_s"] > 0


def test_every_eager_configuration_generates_plain_generates_tokens(hf_dir, plain_generate_tokens):
    """The experts implementations, the static cache and prompt lookup run on a CPU and are the same greedy math;
    names that are wrong or need a GPU are rows with their reason, and the others still run after them."""
    broken = {"bogus": "unknown experts", "grouped_mm+compile": "only with a static cache",
              "eager+static+static": "at most once"}  # fmt: skip
    configs = ["deepgemm", *broken, *EAGER_CONFIGS]
    rows = measure_transformers(hf_dir, PROMPT, NEW_TOKENS, torch.float32, configs=configs)

    assert list(rows) == configs
    _assert_ran_like_generate(rows, EAGER_CONFIGS, plain_generate_tokens)
    for name, reason in broken.items():
        assert reason in rows[name]["error"], rows[name]["error"]
        assert rows[name]["tokens_per_s"] is None and rows[name]["runs_tokens_per_s"] == []
        assert "\n" not in rows[name]["error"]
    if not torch.cuda.is_available():
        assert "CUDA" in rows["deepgemm"]["error"]
    assert best_baseline(rows) in EAGER_CONFIGS


def test_static_cache_with_torch_compile_generates_plain_generates_tokens(hf_dir, plain_generate_tokens):
    """Both compiled rows of the defaults: about 25 s here with a cold inductor cache, 10 s with a warm one."""
    names = ["batched_mm+static+compile", "grouped_mm+static+compile"]
    rows = measure_transformers(hf_dir, PROMPT, NEW_TOKENS, torch.float32, configs=names)

    _assert_ran_like_generate(rows, names, plain_generate_tokens)


def test_a_checkpoint_transformers_does_not_fully_load_is_an_error_row(hf_dir, tmp_path: Path):
    """Not the same weights (here the output head is missing): no numbers, the key named."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v for f in Path(hf_dir).glob("*.safetensors") for k, v in load_file(f).items()}
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(Path(hf_dir) / "config.json", tmp_path / "config.json")

    row = measure_transformers(str(tmp_path), PROMPT, NEW_TOKENS, torch.float32, configs=["eager"])["eager"]

    assert row["tokens_per_s"] is None and "missing ['lm_head.weight']" in row["error"]


def test_fewer_than_three_repeats_is_refused(hf_dir):
    with pytest.raises(ValueError, match="at least 3"):
        measure_transformers(hf_dir, PROMPT, NEW_TOKENS, torch.float32, repeats=2, configs=["eager"])


def test_configuration_names_parse_and_every_default_has_a_label():
    config = parse_config("batched_mm+static+compile")
    assert (config.experts, config.static_cache, config.compile, config.prompt_lookup) == (
        "batched_mm", True, True, False)  # fmt: skip
    assert parse_config("grouped_mm+prompt_lookup").prompt_lookup
    for bad in ["", "eager+fast", "eager+compile", "eager+static+prompt_lookup"]:
        with pytest.raises(ValueError):
            parse_config(bad)
    for name in DEFAULT_CONFIGS:
        parse_config(name)
        assert name in CONFIG_LABELS


def test_best_baseline_is_the_fastest_row_that_ran():
    rows = {"a": {"tokens_per_s": 10.0, "error": None}, "b": {"tokens_per_s": None, "error": "x"},
            "c": {"tokens_per_s": 12.5, "error": None}}  # fmt: skip
    assert best_baseline(rows) == "c"
    assert best_baseline({"b": rows["b"]}) is None


def test_the_table_marks_the_best_baseline_and_says_why_a_row_did_not_run():
    ran = {"tokens_per_s": 12.5, "runs_tokens_per_s": [12.0, 12.5, 13.0], "setup_s": 4.0, "error": None}
    rows = {"eager": {**ran, "tokens_per_s": 10.0}, "grouped_mm+static+compile": ran,
            "deepgemm": {"tokens_per_s": None, "error": "RuntimeError: needs a | CUDA GPU"}}  # fmt: skip
    lines = format_rows(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert CONFIG_LABELS["grouped_mm+static+compile"] in lines[3] and "best baseline" in lines[3]
    assert "best baseline" not in lines[2] and "12.0, 12.5, 13.0" in lines[3]
    assert "does not run: RuntimeError: needs a / CUDA GPU" in lines[4]


def test_export_for_transformers_passes_hf_checkpoints_and_exports_training_ones(hf_dir, tmp_path: Path):
    from transformers import DeepseekV3ForCausalLM

    from raymoe.platform.train.trainer import LocalTrainer

    with export_for_transformers(hf_dir) as path:
        assert path == hf_dir
    trainer = LocalTrainer(load_config("tiny", ["tracking.enabled=false"]))
    trainer.save_checkpoint(str(tmp_path / "run"), {"loader": {"epoch": 0, "position": 0}})
    with export_for_transformers(str(tmp_path / "run")) as path:
        model = DeepseekV3ForCausalLM.from_pretrained(path).eval()
        assert model.config.num_hidden_layers == trainer.cfg.model.num_hidden_layers
    assert not os.path.exists(path)
