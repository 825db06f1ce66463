"""transformers at its best on batch-1 greedy decode: one row per configuration, each the median of timed runs.

A configuration is named ``EXPERTS[+static[+compile]][+prompt_lookup]``:

- ``EXPERTS`` is transformers 5's experts implementation (``from_pretrained(experts_implementation=...)``):
  ``eager`` (a loop over the routed experts), ``grouped_mm`` (its default: one grouped GEMM),
  ``batched_mm`` (the selected experts' weights gathered per token), ``deepgemm`` and ``sonicmoe``
  (CUDA kernels fetched from the Hub; reported as not running on a CPU);
- ``+static`` generates with ``cache_implementation="static"`` (a preallocated cache);
- ``+compile`` compiles the decode step, which ``generate`` does itself with a static cache
  (``CompileConfig``; on a CPU it must be asked for, and ``reduce-overhead``'s CUDA graphs do not apply);
- ``+prompt_lookup`` is assisted generation by prompt lookup (``prompt_lookup_num_tokens``), which needs
  no draft model. Assisted generation with a draft model needs a smaller model with the same tokenizer,
  and no checkpoint here has one, so it is not a configuration.

Each configuration loads a fresh model (and resets torch.compile's caches around it), is warmed up
with untimed runs of the same length, then timed ``repeats`` times: greedy, end of sequence disabled,
exactly ``new_tokens`` tokens, the prompt's prefill included, as our engine's rows are timed. The
model must load every weight of the folder but the MTP modules (same weights as ours). A configuration
that fails is a row with its ``error``; the others still run. ``setup_s`` is the warm-up, compile
included; inductor keeps compiled kernels on disk, so a second process compiles faster (bench checkpoint:
12-24 s the first time, 3.5-7 s after).

Measured on the bench checkpoint (2 CPU cores, bf16, 32-token prompt, 128 new tokens, 2026-12-02):
``batched_mm+static+compile`` was the fastest (133-153 tok/s), then ``grouped_mm+static+compile``
(123-143); the eager-mode rows ran at 70-87 and prompt lookup at 61-65.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")  # transformers 5.x
CUDA_ONLY_EXPERTS = ("deepgemm", "sonicmoe")  # kernels-community kernels for NVIDIA GPUs
DEFAULT_CONFIGS = [
    "grouped_mm",  # what plain `generate` uses: transformers' default experts, its default (dynamic) cache
    "eager",
    "batched_mm",
    "deepgemm",
    "sonicmoe",
    "grouped_mm+static",
    "grouped_mm+static+compile",
    "batched_mm+static+compile",
    "grouped_mm+prompt_lookup",
]
CONFIG_LABELS = {
    "grouped_mm": "transformers generate (grouped_mm experts, default)",
    "eager": "transformers, eager experts",
    "batched_mm": "transformers, batched_mm experts",
    "deepgemm": "transformers, deepgemm experts",
    "sonicmoe": "transformers, sonicmoe experts",
    "grouped_mm+static": "transformers, static cache",
    "grouped_mm+static+compile": "transformers, static cache + torch.compile",
    "batched_mm+static+compile": "transformers, batched_mm + static cache + torch.compile",
    "grouped_mm+prompt_lookup": "transformers, prompt-lookup decoding",
}
MIN_REPEATS = 3  # issue 15: every row the median of at least three runs
PROMPT_LOOKUP_TOKENS = 10  # transformers' documented example value
WARMUP_RUNS = 1
COMPILED_WARMUP_RUNS = 2  # the first compiled call compiles; a second catches a recompile on the reused cache
ERROR_CHARS = 300


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    """One way of running transformers' ``generate``.

    Args:
        experts: the ``experts_implementation`` passed to ``from_pretrained``.
        static_cache: ``cache_implementation="static"`` instead of the default dynamic cache.
        compile: compile the decode step (needs ``static_cache``).
        prompt_lookup: assisted generation by prompt lookup, ``PROMPT_LOOKUP_TOKENS`` candidates a step.
    """

    experts: str
    static_cache: bool = False
    compile: bool = False
    prompt_lookup: bool = False


def parse_config(name: str) -> BaselineConfig:
    """The configuration named ``EXPERTS[+static[+compile]][+prompt_lookup]``; ValueError says what is wrong."""
    experts, *options = name.split("+")
    if experts not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"unknown experts implementation {experts!r} in {name!r}: one of {EXPERTS_IMPLEMENTATIONS}")
    unknown = set(options) - {"static", "compile", "prompt_lookup"}
    if unknown or len(set(options)) != len(options):
        raise ValueError(f"bad options {options} in {name!r}: each of static, compile, prompt_lookup at most once")
    config = BaselineConfig(experts=experts, static_cache="static" in options, compile="compile" in options,
                            prompt_lookup="prompt_lookup" in options)  # fmt: skip
    if config.compile and not config.static_cache:
        raise ValueError(f"{name!r}: transformers compiles generate's decode step only with a static cache (+static)")
    if config.prompt_lookup and config.static_cache:
        raise ValueError(f"{name!r}: prompt lookup crops the cache, which the static cache does not support")
    return config


@contextlib.contextmanager
def export_for_transformers(checkpoint: str) -> Iterator[str]:
    """A folder ``DeepseekV3ForCausalLM.from_pretrained`` reads with the weights of ``checkpoint``.

    A Hugging Face checkpoint is used as it is; any other (a training checkpoint or output) is exported by
    ``export_hf`` into a temporary folder that is removed on exit."""
    from raymoe.platform.checkpoint import export_hf
    from raymoe.platform.checkpoint.layout import is_hf_checkpoint

    if is_hf_checkpoint(checkpoint):
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="raymoe-hf-") as tmp:
        export_hf(checkpoint, tmp)
        yield tmp


def measure_transformers(
    hf_dir: str,
    prompt: list[int],
    new_tokens: int,
    dtype: torch.dtype,
    repeats: int = MIN_REPEATS,
    configs: list[str] | None = None,
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Batch-1 greedy decode of ``prompt`` by transformers under each configuration (``DEFAULT_CONFIGS``).

    Returns, per configuration name, ``tokens_per_s`` (the median of the timed runs), ``runs_tokens_per_s``,
    ``tokens`` (the ids generated by the last run), ``setup_s`` (the untimed warm-up runs, torch.compile
    included), ``load_s``, ``experts_implementation`` (the one transformers ran) and ``error``: None, or a
    one-line reason when the configuration does not run here (then the numbers are None)."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be at least {MIN_REPEATS} (a median of three runs or more), got {repeats}")
    if new_tokens < 1 or not prompt:
        raise ValueError(f"need a nonempty prompt and new_tokens >= 1, got {len(prompt)} and {new_tokens}")
    rows = {}
    for name in configs or DEFAULT_CONFIGS:
        try:
            rows[name] = _measure_one(hf_dir, prompt, new_tokens, dtype, repeats, parse_config(name), device)
        except Exception as e:  # noqa: BLE001  (a configuration that does not run is a row, never a crash)
            logger.debug("transformers %s does not run", name, exc_info=True)
            rows[name] = _failed(e)
        finally:
            gc.collect()
        row = rows[name]
        logger.info("transformers %s: %s", name, row["error"] or f"{row['tokens_per_s']:.1f} tok/s")
    return rows


def best_baseline(rows: dict[str, dict[str, Any]]) -> str | None:
    """The name of the fastest row that ran (None if none did)."""
    ran = {name: row["tokens_per_s"] for name, row in rows.items() if row["error"] is None}
    return max(ran, key=ran.__getitem__) if ran else None


def format_rows(rows: dict[str, dict[str, Any]]) -> str:
    """The rows as a Markdown table, the best baseline marked; a row that did not run says why."""
    best = best_baseline(rows)
    lines = ["| transformers configuration | tok/s (median) | runs (tok/s) | warm-up s | note |",
             "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name, row in rows.items():
        label = CONFIG_LABELS.get(name, name)
        if row["error"] is not None:
            lines.append(f"| {label} | – | – | – | does not run: {row['error'].replace('|', '/')} |")
            continue
        runs = ", ".join(f"{r:.1f}" for r in row["runs_tokens_per_s"])
        note = "best baseline" if name == best else ""
        lines.append(f"| {label} | {row['tokens_per_s']:.1f} | {runs} | {row['setup_s']:.1f} | {note} |")
    return "\n".join(lines)


def _failed(error: BaseException) -> dict[str, Any]:
    lines = str(error).strip().splitlines() or [""]
    reason = f"{type(error).__name__}: {lines[0]}"
    return {"tokens_per_s": None, "runs_tokens_per_s": [], "tokens": [], "setup_s": None, "load_s": None,
            "experts_implementation": None, "error": reason[:ERROR_CHARS]}  # fmt: skip


def _measure_one(
    hf_dir: str, prompt: list[int], new_tokens: int, dtype: torch.dtype, repeats: int, config: BaselineConfig,
    device: str,
) -> dict[str, Any]:  # fmt: skip
    if config.experts in CUDA_ONLY_EXPERTS and torch.device(device).type != "cuda":
        raise RuntimeError(f"the {config.experts} experts need a CUDA GPU and their kernel from the Hub; not {device}")
    t0 = time.perf_counter()
    model = _load_same_weights(hf_dir, dtype, config.experts).to(device).eval()
    load_s = time.perf_counter() - t0
    if model.config._experts_implementation != config.experts:  # it falls back silently only when not asked
        raise RuntimeError(f"transformers chose experts {model.config._experts_implementation!r}")
    model.generation_config.eos_token_id = None  # exactly new_tokens
    if config.compile:
        torch._dynamo.reset()  # no graphs or recompile counts carried over from another configuration
    try:
        row = _timed_runs(model, prompt, new_tokens, repeats, config)
    finally:
        if config.compile:
            torch._dynamo.reset()  # and none left for the next: the compiled graphs hold this model
    return {**row, "load_s": load_s, "experts_implementation": config.experts, "error": None}


def _load_same_weights(hf_dir: str, dtype: torch.dtype, experts: str) -> Any:
    """transformers' model of ``hf_dir`` with every weight of its decoder loaded, or a RuntimeError saying which not.

    The MTP modules (layers from ``num_hidden_layers`` on) are the only keys it may leave unread: transformers
    does not model them. Its load report, which lists them, is silenced while loading; this check replaces it."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = DeepseekV3ForCausalLM.from_pretrained(
            hf_dir, dtype=dtype, experts_implementation=experts, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    layers = model.config.num_hidden_layers
    not_mtp = [k for k in info["unexpected_keys"] if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers]
    wrong = {"missing": info["missing_keys"], "mismatched": info["mismatched_keys"], "unexpected": not_mtp}
    if any(wrong.values()):
        found = "; ".join(f"{what} {sorted(map(str, keys))[:3]}" for what, keys in wrong.items() if keys)
        raise RuntimeError(f"transformers did not load all of {hf_dir} as DeepseekV3ForCausalLM: {found}")
    return model


def _generate_kwargs(new_tokens: int, config: BaselineConfig, device_type: str) -> dict[str, Any]:
    from transformers import CompileConfig

    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if config.static_cache:
        kwargs["cache_implementation"] = "static"
    if config.compile:
        compile_config = CompileConfig(mode="reduce-overhead" if device_type == "cuda" else "default")
        compile_config._compile_all_devices = True  # generate compiles on a CPU only when told to
        kwargs["compile_config"] = compile_config
    else:
        kwargs["disable_compile"] = True  # a static cache alone stays eager (generate would compile it on a GPU)
    if config.prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
    return kwargs


def _timed_runs(model: Any, prompt: list[int], new_tokens: int, repeats: int, config: BaselineConfig) -> dict:
    """Untimed warm-up runs (``setup_s``), then ``repeats`` timed ones of exactly ``new_tokens`` tokens."""
    kwargs = _generate_kwargs(new_tokens, config, model.device.type)
    ids = torch.tensor([prompt], device=model.device)
    mask = torch.ones_like(ids)

    def generate() -> list[int]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return out[0, len(prompt) :].tolist()

    t0 = time.perf_counter()
    for _ in range(COMPILED_WARMUP_RUNS if config.compile else WARMUP_RUNS):
        generate()
    setup_s = time.perf_counter() - t0
    if config.compile and not hasattr(model, "_compiled_call"):
        raise RuntimeError("generate did not compile the decode step (transformers' criteria were not met)")
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = generate()
        runs.append(len(tokens) / (time.perf_counter() - t0))
        if len(tokens) != new_tokens:
            raise RuntimeError(f"generated {len(tokens)} tokens, not {new_tokens}")
    return {"tokens_per_s": statistics.median(runs), "runs_tokens_per_s": runs, "tokens": tokens, "setup_s": setup_s}
