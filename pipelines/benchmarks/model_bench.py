"""``raymoe bench model``: our training step and greedy decode against transformers' DeepseekV3, side by side.

One run measures, on this machine:

- the float32 and bf16 matmul rates (TFLOP/s at a square shape and at the model's own
  ``tokens × hidden × intermediate`` shape; the better of the two is the dtype's rate);
- the preset's training step (forward, backward, gradient clipping, AdamW; ours also its bias
  update) on one batch of ``train.batch_size × train.seq_len`` tokens, and greedy decode (batch 1,
  a ``prompt_len`` prompt, ``decode_tokens`` new tokens, prefill included), in float32 and bf16,
  for our model and for transformers' ``DeepseekV3ForCausalLM`` under each experts
  implementation that runs on a CPU.

bf16 means mixed precision for training (``torch.autocast``: bf16 matmuls, float32 master
weights and AdamW state, for both models) and bf16 weights for decode (ours through
:func:`~raymoe.platform.model.transformer.prepare_for_inference`, which keeps the routers in float32;
transformers' through ``model.to(torch.bfloat16)``).

Every (implementation, dtype, mode) runs in its own worker process (``python -m
raymoe.pipelines.benchmarks.model_bench --worker SPEC``), so the peak resident memory it reports
(``VmHWM``) is its own. A worker may map at most ``memory_limit_mib`` (``RLIMIT_AS``), so running
out of memory is a clean error, not the kernel's OOM killer; a failed worker is reported as such
and the run goes on. Warmup steps are not timed; tokens/s is that of the median timed step (or
generate call), and every timed step's seconds are in the report.

MFU = model FLOPs per second ÷ the measured matmul rate of the dtype. Model FLOPs per trained
token are :func:`raymoe.platform.info.train_flops_per_token` without MTP (6 × activated matrix
parameters + causal attention; transformers' model has no MTP); per decoded token 2 × activated
matrix parameters + attention over the mean context (the prompt's prefill is timed, not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from raymoe.platform.config import ConfigError, RaymoeConfig, load_config, model_config_to_hf
from raymoe.platform.info import FLOPS_PER_MAC, count_params, train_flops_per_token

logger = logging.getLogger(__name__)

WORKER_MODULE = "raymoe.pipelines.benchmarks.model_bench"
RESULT_PREFIX = "RAYMOE_BENCH_RESULT "  # marks the worker's result line on its stdout
OURS = "ours"
HF_EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")  # transformers 5's experts kernels that run on CPU
HF_CUDA_ONLY_IMPLEMENTATIONS = ("deepgemm", "sonicmoe")  # also registered, but CUDA kernels: reported as skipped
IMPLEMENTATIONS = (OURS, *HF_EXPERTS_IMPLEMENTATIONS)
# IMPL+compile: the training step with torch.compile, ours by ``train.compile`` (each block's dense parts;
# the routed experts stay eager), transformers' whole model (``model.compile()``: on the bench preset, bf16,
# 0.96 s a step against 1.01 s with each decoder layer compiled and 1.16 s eager, 2026-12-03); train only
COMPILED = "+compile"
CHOICES = (*IMPLEMENTATIONS, *(impl + COMPILED for impl in IMPLEMENTATIONS))
DTYPES = ("fp32", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("train", "decode")
SEED = 0
MIB = 2**20
KIB = 1024
TERA = 1e12
MEMORY_LIMIT_FRACTION = 0.75  # of the memory available when the bench starts, per worker
WORKER_TIMEOUT_S = 900.0  # the slowest configuration (transformers eager, fp32) takes ~40 s on a quiet 2-core machine
MATMUL_WARMUP_CALLS = 2
# the rate is that of the best of several short windows: another process can only slow a window
# down (on a busy machine one 0.5 s window read fp32 at 0.14 TFLOP/s, quiet ones 0.18)
MATMUL_WINDOWS = 5


@dataclass(kw_only=True)
class BenchOptions:
    """What ``raymoe bench model`` runs; :meth:`quick` is a seconds-long smoke test."""

    preset: str = "bench"
    overrides: list[str] = field(default_factory=list)  # dotted config overrides (train.batch_size=4, ...)
    impls: tuple[str, ...] = IMPLEMENTATIONS
    dtypes: tuple[str, ...] = DTYPES
    warmup_steps: int = 5  # training steps run before the timed ones (2 left the timed steps at 0.78-1.16 s)
    train_steps: int = 8  # timed training steps
    prompt_len: int = 32
    decode_tokens: int = 64  # new tokens per generate call
    decode_repeats: int = 5  # timed generate calls (after one untimed call); ~1 s each on the bench preset
    square_matmul_size: int = 2048
    matmul_min_s: float = 1.0  # time each matmul shape for at least this long, in MATMUL_WINDOWS windows
    worker_timeout_s: float = WORKER_TIMEOUT_S
    memory_limit_mib: int | None = None  # per worker; None = MEMORY_LIMIT_FRACTION of the memory available
    device: str = "cpu"  # cpu | cuda: where every configuration runs (peak memory is then the device's)

    @classmethod
    def quick(cls) -> BenchOptions:
        """The tiny preset, ours against transformers' eager experts in float32, one timed step."""
        return cls(
            preset="tiny",
            impls=(OURS, "eager"),
            dtypes=("fp32",),
            warmup_steps=1,
            train_steps=1,
            prompt_len=8,
            decode_tokens=4,
            decode_repeats=1,
            square_matmul_size=256,
            matmul_min_s=0.05,
        )


@dataclass(frozen=True)
class Job:
    """One worker process: the matmul rates, or one (implementation, dtype, mode)."""

    kind: str  # "matmul" | "train" | "decode"
    impl: str = ""
    dtype: str = ""

    @property
    def label(self) -> str:
        return "matmul rates" if self.kind == "matmul" else f"{self.impl} {self.dtype} {self.kind}"


def check_options(opts: BenchOptions) -> RaymoeConfig:
    """Validate ``opts``; return the config it benchmarks. Raises :class:`ConfigError` naming the bad option."""
    for name, chosen, allowed in (("--impls", opts.impls, CHOICES), ("--dtypes", opts.dtypes, DTYPES)):
        unknown = [x for x in chosen if x not in allowed]
        if unknown or not chosen:
            raise ConfigError(f"{name} {','.join(chosen)!r}: choose from {','.join(allowed)}")
    for name in ("train_steps", "prompt_len", "decode_tokens", "decode_repeats", "square_matmul_size"):
        if getattr(opts, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(opts, name)}")
    if opts.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {opts.warmup_steps}")
    if opts.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {opts.device!r}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here")
    cfg = load_config(opts.preset, opts.overrides)
    if opts.prompt_len + opts.decode_tokens > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"--prompt-len {opts.prompt_len} + --decode-tokens {opts.decode_tokens} exceeds model."
            f"max_position_embeddings ({cfg.model.max_position_embeddings})"
        )
    return cfg


def plan_jobs(opts: BenchOptions) -> list[Job]:
    """The matmul rates first, then every implementation × dtype × mode (``+compile``: train only)."""
    return [Job("matmul")] + [
        Job(mode, impl, dtype)
        for impl in opts.impls
        for dtype in opts.dtypes
        for mode in MODES
        if mode == "train" or not compiled(impl)
    ]


def compiled(impl: str) -> bool:
    """Whether ``impl`` (a ``--impls`` choice) trains with torch.compile (ours regional, transformers' whole model)."""
    return impl.endswith(COMPILED)


def is_ours(impl: str) -> bool:
    """Whether ``impl`` is our model (compiled or not)."""
    return impl.removesuffix(COMPILED) == OURS


# --------------------------------------------------------------------------- the driver


def default_memory_limit_mib() -> int:
    """MEMORY_LIMIT_FRACTION of ``MemAvailable`` now (of physical memory where /proc is missing)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * KIB
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(available * MEMORY_LIMIT_FRACTION / MIB)


def run_job(job: Job, opts: BenchOptions, memory_limit_mib: int) -> dict[str, Any]:
    """Run ``job`` in a fresh worker process; its result dict (``ok`` False and ``error`` on failure)."""
    spec = json.dumps({"job": dataclasses.asdict(job), "options": dataclasses.asdict(opts), "limit": memory_limit_mib})
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    # -P: the working directory stays off sys.path, so a checkout's top-level kernels/ folder cannot shadow
    # the `kernels` package that transformers (>= 5.25) imports when it compiles
    cmd = [sys.executable, "-P", "-m", WORKER_MODULE, "--worker", spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.worker_timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {opts.worker_timeout_s:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    if proc.returncode < 0:
        oom = " (out of memory?)" if -proc.returncode == signal.SIGKILL else ""
        return {"ok": False, "error": f"killed by signal {-proc.returncode}{oom}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"worker exited with code {proc.returncode}: {tail}"}


def run_model_bench(
    opts: BenchOptions, progress: Callable[[Job, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run every job of ``opts`` one after another; return the report (see :func:`summarize`)."""
    cfg = check_options(opts)
    limit = opts.memory_limit_mib or default_memory_limit_mib()
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    results: dict[Job, dict[str, Any]] = {}
    for job in plan_jobs(opts):
        results[job] = run_job(job, opts, limit)
        logger.info("%s: %s", job.label, _brief(results[job]))
        if progress is not None:
            progress(job, results[job])
    # 1-min load average before the bench and after it (the latter counts the bench's own threads)
    context = {"seconds": time.perf_counter() - start, "load_average": [load_start, os.getloadavg()[0]]}
    return summarize(cfg, opts, results, {**context, "memory_limit_mib": limit})


def _brief(result: dict[str, Any]) -> str:
    if not result.get("ok"):
        return f"failed: {result.get('error')}"
    if "tflops" in result:
        return ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in result["tflops"].items())
    return f"{result['tokens_per_s']:,.1f} tok/s, peak {result['peak_mib']:,.0f} MiB"


# --------------------------------------------------------------------------- the report


def flops_per_token(cfg: RaymoeConfig, opts: BenchOptions) -> dict[str, float]:
    """Model FLOPs per trained token and per decoded token (main model, no MTP)."""
    m = cfg.model
    counts = count_params(m)
    train = train_flops_per_token(m, cfg.train.seq_len, include_mtp=False, counts=counts)
    mean_keys = opts.prompt_len + (opts.decode_tokens + 1) / 2  # keys a decoded token attends to, on average
    attention = FLOPS_PER_MAC * m.num_hidden_layers * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * mean_keys
    return {"train": train, "decode": FLOPS_PER_MAC * counts.activated_matrix + attention}


def _best(configs: list[dict[str, Any]], mode: str, ours: bool) -> dict[str, Any] | None:
    rows = [c for c in configs if is_ours(c["impl"]) == ours and c[f"{mode}_tokens_per_s"]]
    return max(rows, key=lambda c: c[f"{mode}_tokens_per_s"], default=None)


NOT_RUN: dict[str, Any] = {"ok": False}  # a (configuration, mode) not planned (decode of a +compile row)


def summarize(
    cfg: RaymoeConfig, opts: BenchOptions, results: dict[Job, dict[str, Any]], context: dict[str, Any]
) -> dict[str, Any]:
    """The JSON report: matmul rates, one row per (implementation, dtype), speedups and peak memory.

    ``train_speedup`` / ``decode_speedup`` are our fastest tokens/s over transformers' fastest
    (None when either side has no result); ``peak_mib`` holds the peaks of those fastest runs.
    """
    matmul = results[Job("matmul")]
    rates = matmul.get("tflops", {}) if matmul.get("ok") else {}
    flops = flops_per_token(cfg, opts)
    configs = []
    for impl in opts.impls:
        for dtype in opts.dtypes:
            row: dict[str, Any] = {"impl": impl, "dtype": dtype}
            for mode in MODES:
                r = results.get(Job(mode, impl, dtype), NOT_RUN)
                ok = bool(r.get("ok"))
                tps = r["tokens_per_s"] if ok else None
                rate = rates.get(dtype)
                row[f"{mode}_tokens_per_s"] = tps
                row[f"{mode}_mfu"] = tps * flops[mode] / (rate * TERA) if ok and rate else None
                row[f"{mode}_peak_mib"] = r.get("peak_mib")
                row[f"{mode}_base_mib"] = r.get("base_mib")  # resident after imports, before the model is built
                row[f"{mode}_seconds"] = r.get("seconds")  # each timed step / generate call
                row[f"{mode}_first_s"] = r.get("first_s")  # the first (untimed) call: compiles happen here
                row[f"{mode}_error"] = None if ok or r is NOT_RUN else r.get("error", "unknown error")
            configs.append(row)
    report: dict[str, Any] = {
        "preset": opts.preset,
        "overrides": opts.overrides,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "prompt_len": opts.prompt_len,
        "decode_tokens": opts.decode_tokens,
        "warmup_steps": opts.warmup_steps,
        "train_steps": opts.train_steps,
        "decode_repeats": opts.decode_repeats,
        "threads": matmul.get("threads"),
        "device": opts.device,
        "device_name": matmul.get("device_name"),
        "matmul_tflops": rates,
        "matmul": matmul.get("shapes", []),
        "matmul_error": None if matmul.get("ok") else matmul.get("error"),
        "flops_per_token": flops,
        "configs": configs,
        "skipped": [f"transformers {impl}: CUDA only" for impl in HF_CUDA_ONLY_IMPLEMENTATIONS],
        "versions": matmul.get("versions"),
        **context,
    }
    for mode in MODES:
        ours, theirs = _best(configs, mode, ours=True), _best(configs, mode, ours=False)
        key = f"{mode}_tokens_per_s"
        report[f"{mode}_speedup"] = ours[key] / theirs[key] if ours and theirs else None
        report.setdefault("fastest", {})[mode] = {
            side: f"{best['impl']} {best['dtype']}" if best else None
            for side, best in (("ours", ours), ("transformers", theirs))
        }
        report.setdefault("peak_mib", {})[mode] = {
            side: best[f"{mode}_peak_mib"] if best else None
            for side, best in (("ours", ours), ("transformers", theirs))
        }
    return report


# --------------------------------------------------------------------------- the worker


def _memory_mib(device: str = "cpu") -> tuple[float, float]:
    """(resident now, peak resident) of this process in MiB; on CUDA the device memory allocated (now, peak)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / MIB, torch.cuda.max_memory_allocated() / MIB
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / KIB, int(fields["VmHWM"].split()[0]) / KIB
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB  # KiB on Linux
        return peak, peak


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(
    call: Callable[[], object], warmup: int, repeats: int, device: str = "cpu"
) -> tuple[float | None, list[float]]:
    """Seconds of the first of ``warmup`` untimed calls (None without one; a compile happens there) and of
    each of ``repeats`` calls after them (the device synchronized around each)."""
    first = None
    for i in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    seconds = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return first, seconds


def _random_tokens(cfg: RaymoeConfig, batch: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, cfg.model.vocab_size, (batch, length), generator=gen)


def _hf_model(cfg: RaymoeConfig, impl: str) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM of ``cfg.model`` with the experts implementation ``impl``."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = model_config_to_hf(cfg.model)
    for key in ("architectures", "model_type", "rope_scaling", "rope_theta"):
        fields.pop(key, None)
    torch.manual_seed(SEED)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields, experts_implementation=impl))
    if model.config._experts_implementation != impl:
        raise RuntimeError(f"transformers chose experts implementation {model.config._experts_implementation!r}")
    return model


def _measure_matmuls(cfg: RaymoeConfig, opts: BenchOptions) -> dict[str, Any]:
    """TFLOP/s of ``F.linear`` per dtype at a square and at the dense MLP's shape (the best window of
    each); the dtype's rate is the better shape's."""
    n = opts.square_matmul_size
    tokens = cfg.train.batch_size * cfg.train.seq_len
    shapes = {"square": (n, n, n), "model": (tokens, cfg.model.hidden_size, cfg.model.intermediate_size)}
    out, best = [], {}
    for dtype in opts.dtypes:
        for name, (m, k, nn) in shapes.items():
            a = torch.randn(m, k, dtype=TORCH_DTYPES[dtype], device=opts.device)
            w = torch.randn(nn, k, dtype=TORCH_DTYPES[dtype], device=opts.device)
            for _ in range(MATMUL_WARMUP_CALLS):
                F.linear(a, w)
            seconds_per_call = []
            for _ in range(MATMUL_WINDOWS):
                _sync(opts.device)
                calls, t0 = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - t0) < opts.matmul_min_s / MATMUL_WINDOWS:
                    F.linear(a, w)
                    calls += 1
                    if opts.device == "cuda" and calls % 8 == 0:
                        _sync(opts.device)  # launches are asynchronous: count work done, not work queued
                _sync(opts.device)
                elapsed = time.perf_counter() - t0
                seconds_per_call.append(elapsed / calls)
            tflops = FLOPS_PER_MAC * m * k * nn / min(seconds_per_call) / TERA
            out.append({"dtype": dtype, "name": name, "m": m, "k": k, "n": nn, "tflops": tflops})
            best[dtype] = max(best.get(dtype, 0.0), tflops)
    versions = {"torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        versions["transformers"] = None
    name = torch.cuda.get_device_name() if opts.device == "cuda" else None
    return {"ok": True, "shapes": out, "tflops": best, "threads": torch.get_num_threads(), "versions": versions,
            "device_name": name}  # fmt: skip


def _train(cfg: RaymoeConfig, job: Job, opts: BenchOptions) -> tuple[Callable[[], object], int]:
    """The training step of ``job`` as a callable, and the tokens it processes."""
    device = torch.device(opts.device)
    tokens = _random_tokens(cfg, cfg.train.batch_size, cfg.train.seq_len + 1).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    cfg.train.dtype = job.dtype
    cfg.parallel.device = opts.device
    impl = job.impl.removesuffix(COMPILED)
    if impl == OURS:
        from raymoe.platform.train.trainer import LocalTrainer

        cfg.train.compile = compiled(job.impl)
        trainer = LocalTrainer(cfg)
        return (lambda: trainer.train_step([(inputs, labels)])), inputs.numel()

    from raymoe.platform.train.optim import build_optimizer
    from raymoe.platform.train.trainer import autocast_context

    model = _hf_model(cfg, impl).to(device).train()
    if compiled(job.impl):
        model.compile()  # the whole model: faster than each decoder layer compiled (see COMPILED)
    optimizer = build_optimizer(list(model.named_parameters()), cfg.train)  # the same AdamW as ours
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        with autocast_context(job.dtype, device):
            loss = model(input_ids=inputs, labels=inputs).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, inputs.numel()


def _decode(cfg: RaymoeConfig, job: Job, opts: BenchOptions) -> tuple[Callable[[], object], int]:
    """One greedy generate call of ``job`` (batch 1, exactly ``decode_tokens`` new tokens), and that count."""
    prompt = _random_tokens(cfg, 1, opts.prompt_len)
    n_new = opts.decode_tokens
    if job.impl == OURS:
        from raymoe.platform.inference.engine import generate
        from raymoe.platform.model.transformer import prepare_for_inference
        from raymoe.platform.train.trainer import build_model

        model = prepare_for_inference(build_model(cfg, opts.device), TORCH_DTYPES[job.dtype])

        def call() -> None:
            (new,) = generate(model, prompt.tolist(), n_new, temperature=0.0)  # no EOS: always n_new tokens
            if len(new) != n_new:
                raise RuntimeError(f"generate returned {len(new)} tokens, not {n_new}")

        return call, n_new

    model = _hf_model(cfg, job.impl).to(opts.device).eval()
    if job.dtype != "fp32":
        model.to(TORCH_DTYPES[job.dtype])
    model.generation_config.eos_token_id = None  # never stop early
    prompt = prompt.to(opts.device)
    mask = torch.ones_like(prompt)

    def hf_call() -> None:
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        if out.shape[1] != prompt.shape[1] + n_new:
            raise RuntimeError(f"transformers generated {out.shape[1] - prompt.shape[1]} tokens, not {n_new}")

    return hf_call, n_new


def run_worker(job: Job, opts: BenchOptions, memory_limit_mib: int) -> dict[str, Any]:
    """Run one job in this process (a fresh one: the peak memory is the job's own)."""
    if opts.device == "cpu":  # a CUDA context maps far more address space than it uses: no limit there
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_mib * MIB, resource.RLIM_INFINITY))
    torch.set_num_threads(os.cpu_count() or 1)
    # every implementation gets the allocator setting our trainer uses ($RAYMOE_MALLOC_MMAP_THRESHOLD=0: none)
    from raymoe.platform.devices import tune_host_allocator

    tune_host_allocator()
    torch.manual_seed(SEED)
    cfg = load_config(opts.preset, opts.overrides)
    try:
        if job.kind == "matmul":
            return _measure_matmuls(cfg, opts)
        if not is_ours(job.impl):
            import transformers  # noqa: F401 - imported before the base measurement, like ours' modules

        base_mib = _memory_mib(opts.device)[0]
        if job.kind == "train":
            call, tokens = _train(cfg, job, opts)
            first, seconds = _timed(call, opts.warmup_steps, opts.train_steps, opts.device)
        else:
            call, tokens = _decode(cfg, job, opts)
            with torch.inference_mode():
                first, seconds = _timed(call, 1, opts.decode_repeats, opts.device)
    except (MemoryError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, MemoryError) or "allocate" in text:
            asked = re.search(r"allocate (\d+) bytes", text)
            detail = f"a {int(asked.group(1)) / MIB:,.0f} MiB allocation failed" if asked else text[:160]
            return {"ok": False, "error": f"out of memory (limit {memory_limit_mib:,} MiB): {detail}"}
        return {"ok": False, "error": f"{type(exc).__name__}: {text[:200]}"}
    return {
        "ok": True,
        "tokens_per_s": tokens / statistics.median(seconds),  # the median resists another process's burst
        "seconds": seconds,
        "first_s": first,
        "peak_mib": _memory_mib(opts.device)[1],
        "base_mib": base_mib,
    }


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``--worker SPEC`` runs one job and prints its result line."""
    parser = argparse.ArgumentParser(description="one worker of `raymoe bench model` (run by the bench itself)")
    parser.add_argument("--worker", required=True, help="JSON spec: job, options and memory limit")
    spec = json.loads(parser.parse_args(argv).worker)
    options = spec["options"]
    opts = BenchOptions(**{**options, "impls": tuple(options["impls"]), "dtypes": tuple(options["dtypes"])})
    result = run_worker(Job(**spec["job"]), opts, int(spec["limit"]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
