"""``raymoe demo``: prepare the built-in corpus once, pretrain the ``small`` preset for a few
minutes on the actor graph (dp=1, pp=2, ep=2 on a local Ray) with MLflow tracking, then sample
from the checkpoint."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from raymoe.platform.checkpoint.layout import CHECKPOINTS_DIR
from raymoe.platform.config import load_config

DEMO_PROMPT = "def fibonacci(n):\n    "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain the small preset on the built-in corpus and print a sample")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    p.add_argument("--output", default="outputs/demo", help="checkpoints go here (default outputs/demo)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="prompt of the sample")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--trainer", choices=["graph", "local"], default="graph", help="the trainer (default graph)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the sample (0 = greedy)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from raymoe.actors.trainers import build_trainer
    from raymoe.pipelines.pretrain import default_data_dir, ensure_default_data
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.inference.engine import generate
    from raymoe.platform.inference.loading import open_served
    from raymoe.platform.tracking import resolve_tracking_uri
    from raymoe.platform.train.loop import pretrain

    cfg = load_config("small", ["train.eval_every=50", "parallel.pp=2", "parallel.ep=2", *args.overrides])
    output = Path(args.output)
    data_dir = default_data_dir(cfg)
    print(f"raymoe demo: 1. the corpus: the Python standard library's source, tokenized into {data_dir}/ (once)")
    t0 = time.perf_counter()
    ensure_default_data(data_dir, cfg)
    print(f"raymoe demo: 2. pretraining the 'small' preset: {cfg.train.steps} steps of {cfg.train.batch_size}×"
          f"{cfg.train.seq_len} tokens in {_dtype_words(cfg)} on the actor graph (dp={cfg.parallel.dp}, "
          f"pp={cfg.parallel.pp}, ep={cfg.parallel.ep}: {cfg.parallel.dp * cfg.parallel.pp} attention stages, "
          f"{cfg.parallel.ep} expert shards, on a local Ray), tracked in MLflow")  # fmt: skip
    stale = output / CHECKPOINTS_DIR
    if stale.is_dir():  # the demo starts afresh: an earlier demo's checkpoints would mislead --resume
        shutil.rmtree(stale)
    result = pretrain(cfg, data_dir, output, run_name="demo",
                      trainer=lambda: build_trainer(cfg, args.trainer, str(output)))  # fmt: skip
    print(
        f"trained {len(result.losses)} steps: loss {result.first_loss:.3f} -> {result.last_loss:.3f}, validation "
        f"loss {result.val_loss:.3f}, MaxVio_global {result.max_vio_global:.3f}, {result.tokens_per_s:,.0f} tokens/s"
    )
    served = open_served(str(result.checkpoint))
    model = load_model(served.reader)
    prompt_ids = served.tokenizer.encode(args.prompt).ids
    new_ids = generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=0.95, seed=0, eos_token_id=served.eos_token_id)[0]  # fmt: skip
    how = "greedy" if args.temperature <= 0 else f"temperature {args.temperature:g}, top-p 0.95, seed 0"
    print(f"\nraymoe demo: 3. a sample from the checkpoint ({how}; after {cfg.train.steps} steps on a CPU the model")
    print(
        "   has learned Python's look, not its meaning: expect plausible tokens, repeated phrases and no working code)"
    )
    print("--- sample ---")
    print(args.prompt + served.tokenizer.decode(new_ids))
    print("--- end of sample ---\n")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    print(f"checkpoint (one file per actor, with tokenizer.json): {result.checkpoint}")
    prog = _command_name()
    print(f"MLflow run {result.run_id} in {resolve_tracking_uri(cfg.tracking.uri)}")
    print(f"  see it: {prog} ui   (then open http://127.0.0.1:5000)")
    if result.tracking_warning:
        print(f"  tracking: {result.tracking_warning}")
    print(f"sample more: {prog} generate --checkpoint {output} --prompt 'import os'")
    print(f"export it for transformers: {prog} export --checkpoint {output} --out {output}/hf")
    print(f"serve it (OpenAI API at http://127.0.0.1:8000/v1): {prog} serve --checkpoint {output}")
    return 0


def _dtype_words(cfg) -> str:  # noqa: ANN001
    """The dtype the demo trains in here, and why when the preset left it to the machine."""
    from raymoe.platform.devices import bf16_matmul_is_fast, resolve_device, train_dtype

    device = resolve_device(cfg.parallel.device)
    dtype = train_dtype(cfg.train.dtype, device)
    if cfg.train.dtype != "auto":
        return dtype
    why = "runs bf16 products fast" if bf16_matmul_is_fast(device) else "has no fast bf16 products: float32 is faster"
    return f"{dtype} (train.dtype=auto: this {device.type.upper()} {why})"


def _command_name() -> str:
    """``raymoe`` when it is on PATH, else the path this command was started by (``.venv/bin/raymoe``)."""
    started = Path(sys.argv[0])
    on_path = shutil.which("raymoe")
    if on_path and Path(on_path).resolve() == started.resolve():
        return "raymoe"
    return os.path.relpath(started) if started.name == "raymoe" else "raymoe"
