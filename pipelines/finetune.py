"""``raymoe finetune``: fine-tune a checkpoint on prepared data, fully, with a frozen router, or ESFT's experts only.

    raymoe finetune --from outputs/demo --data data/docs --method esft-token --general data/stdlib-4096-256
    raymoe finetune --from hf/ckpt --data data/docs --method full --runner graph parallel.ep=2 --save-delta

``--from`` is any checkpoint raymoe loads: a training output or checkpoint, a Hugging Face
DeepSeek-V3-layout directory, a delta, or a ``models:/`` URI. ``--data`` is a directory written by
``raymoe prepare-data`` with the checkpoint's tokenizer (``--tokenizer CKPT/tokenizer.json``). The
run's settings are the base run's (its ``train``, ``parallel`` and ``tracking`` sections; defaults
for a Hugging Face checkpoint) with the fine-tune's: ``--steps``, ``--lr``, the data's sequence
length, the ``finetune.*`` section, then the dotted overrides. For ESFT the experts are selected from
the routing of the data's first ``finetune.sample_sequences`` sequences, on the same runner. Every
step is logged to MLflow (experiment ``raymoe-finetune``) with the routing metrics and, every
``finetune.general_every`` steps, the loss on ``--general`` (forgetting). ``--save-delta`` writes
the changed tensors only (``OUTPUT/delta``), which load back over the base. The library is
:mod:`raymoe.platform.train.finetune`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "raymoe-finetune"
REGISTERED_MODEL = "raymoe-finetune"  # the Model Registry name of fine-tuned checkpoints (tracking.registered_model)
DEFAULT_STEPS = 50
DEFAULT_LR = 1e-4
DELTA_DIR = "delta"
RUNNERS = ("local", "graph")


def register(sub: argparse._SubParsersAction) -> None:
    from raymoe.platform.config import FINETUNE_METHODS

    p = sub.add_parser("finetune", help="fine-tune a checkpoint: full, frozen router, or ESFT (selected experts)",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.top_p=0.3 train.batch_size=8")
    p.add_argument("--from", dest="base", required=True, metavar="CHECKPOINT",
                   help="the checkpoint to start from (training output or checkpoint, Hugging Face, delta, "
                   "models:/)")  # fmt: skip
    p.add_argument("--data", required=True, help="prepared data (prepare-data with the checkpoint's tokenizer)")
    p.add_argument("--method", choices=FINETUNE_METHODS, default="full", help="what trains (default full)")
    p.add_argument("--general", help="prepared data whose validation split measures forgetting (default: none)")
    p.add_argument("--output", default="outputs/finetune", help="checkpoints go here (default outputs/finetune)")
    p.add_argument("--runner", choices=RUNNERS, default="local", help="local engine (default) or the actor graph")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default {DEFAULT_LR})")
    p.add_argument("--top-p", type=float, help="ESFT's threshold p in (0, 1] (default finetune.top_p, 0.2)")
    p.add_argument("--bias-update", action="store_true", help="update the gates' biases (finetune.bias_update)")
    p.add_argument("--save-delta", action="store_true", help="also write the changed tensors only (OUTPUT/delta)")
    p.add_argument("--run-name", help="MLflow run name (default finetune/METHOD)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


@dataclass
class FinetuneResult:
    """What one fine-tune produced, for the command's summary and ``raymoe experiment finetune``'s table."""

    method: str
    checkpoint: str
    steps: int
    domain_loss: float  # main loss on the fine-tuning data's validation split, after
    domain_loss_before: float
    general_loss: float | None  # main loss on --general's validation split, after (forgetting)
    general_loss_before: float | None
    trained_params: int
    total_params: int
    saved_bytes: int  # the delta's bytes with --save-delta, else the final checkpoint's model tensors
    delta: str | None
    seconds: float
    selected: dict[str, list[int]] = field(default_factory=dict)
    run_id: str | None = None


def finetune_config(reader: Any, data_dir: str, method: str, steps: int, lr: float, overrides: list[str],
                    top_p: float | None = None, bias_update: bool = False,
                    experiment: str = DEFAULT_EXPERIMENT) -> Any:  # fmt: skip
    """The run's config: the base run's sections (or defaults), the checkpoint's model, the fine-tune's settings."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from raymoe.platform.config import ConfigError, RaymoeConfig, TrackingConfig, config_from_dict, config_to_dict
    from raymoe.platform.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    base_cfg = reader.run_config or RaymoeConfig()
    d = config_to_dict(base_cfg)
    d["model"] = dataclasses.asdict(reader.model_config)
    d["train"].update(init_from=str(reader.location), steps=steps, lr=lr, seq_len=manifest.seq_len,
                      warmup_steps=min(d["train"]["warmup_steps"], max(steps // 10, 1)), eval_every=0,
                      checkpoint_every=0, checkpoint_uri="", keep_last=0, bias_update_speed_final=None)  # fmt: skip
    if d["train"]["batch_size"] % (d["parallel"]["micro_batches"] * d["parallel"]["dp"]):
        d["parallel"].update(micro_batches=1, dp=1)
    d["finetune"] = {**d.get("finetune", {}), "method": method, "bias_update": bias_update, "experts": {}}
    if top_p is not None:
        d["finetune"]["top_p"] = top_p
    d["tracking"]["experiment"] = experiment
    if d["tracking"]["registered_model"] == TrackingConfig().registered_model:  # not beside the pretrained versions
        d["tracking"]["registered_model"] = REGISTERED_MODEL
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
    try:
        merged = OmegaConf.merge(OmegaConf.create(d), OmegaConf.from_dotlist(list(overrides)))
        d = OmegaConf.to_container(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    if not d["finetune"]["bias_update"]:
        d["train"]["bias_update_speed"] = 0.0  # the biases stay as the base has them: as served
    return config_from_dict(d)


def check_tokenizer(base: str, data_dir: str, flag: str = "--data") -> None:
    """ConfigError when the data was tokenized with another tokenizer than the checkpoint's (both present)."""
    from raymoe.platform import storage
    from raymoe.platform.checkpoint.layout import TOKENIZER_FILE
    from raymoe.platform.config import ConfigError

    mine, theirs = storage.join(base, TOKENIZER_FILE), storage.join(data_dir, TOKENIZER_FILE)
    if storage.is_file(mine) and storage.is_file(theirs) and storage.read_bytes(mine) != storage.read_bytes(theirs):
        raise ConfigError(
            f"{flag} {data_dir} was tokenized with another tokenizer than the checkpoint {base}; prepare it "
            f"with `raymoe prepare-data --tokenizer {mine}`"
        )


def _trainer_factory(runner: str, output: str):  # noqa: ANN202
    if runner == "graph":
        from raymoe.actors.runtime import ensure_ray
        from raymoe.actors.trainers import build_trainer

        ensure_ray()
        return lambda cfg: build_trainer(cfg, "graph", output)
    from raymoe.platform.train.trainer import LocalTrainer

    return LocalTrainer


def run_finetune(
    base: str,
    data_dir: str,
    method: str,
    output: str,
    runner: str = "local",
    general: str | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    overrides: list[str] | None = None,
    top_p: float | None = None,
    bias_update: bool = False,
    save_delta: bool = False,
    run_name: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base`` on ``data_dir`` with ``method`` on ``runner``; see the module's docstring."""
    from raymoe.platform.checkpoint.delta import write_delta
    from raymoe.platform.checkpoint.layout import OPTIMIZER_PREFIX
    from raymoe.platform.checkpoint.reader import open_checkpoint
    from raymoe.platform.config import ConfigError
    from raymoe.platform.data.loader import iter_batches
    from raymoe.platform.plots import moe_layer_names
    from raymoe.platform.train.finetune import (
        ESFT_METHODS,
        FinetuneTrainer,
        sample_batches,
        select_for,
        trained_parameters,
    )
    from raymoe.platform.train.loop import evaluate, pretrain

    t0 = time.perf_counter()
    reader = open_checkpoint(base)
    m = reader.model_config
    if m.n_routed_experts <= 0 or m.num_moe_layers + m.num_nextn_predict_layers <= 0:
        raise ConfigError(f"checkpoint {reader.location} has no routing layers: there are no experts to fine-tune")
    check_tokenizer(reader.location, data_dir)
    cfg = finetune_config(reader, data_dir, method, steps, lr, overrides or [], top_p, bias_update, experiment)
    make = _trainer_factory(runner, output)
    batch = cfg.train.batch_size
    general_batches = []
    if general:
        check_tokenizer(reader.location, general, "--general")
        general_batches = [b for _, b in zip(range(cfg.finetune.general_batches),
                                             iter_batches(general, "validation", batch_size=batch))]  # fmt: skip
        if not general_batches:
            raise ConfigError(f"--general {general}: its validation split is empty")
    selected: dict[str, list[int]] = {}
    scores: dict = {}
    before: dict[str, float | None] = {}
    probe = make(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, method="full")))
    try:  # the base's losses (and ESFT's routing sample) on the runner that fine-tunes
        before["domain"] = evaluate(probe, data_dir, batch)[0]
        before["general"] = probe.evaluate(general_batches)[0] if general_batches else None
        if method in ESFT_METHODS:
            records = probe.record(sample_batches(data_dir, cfg.finetune.sample_sequences, batch))
            selected, scores = select_for(cfg, records)
    finally:
        probe.close()
    if selected:
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, experts=selected))
        logger.info("ESFT (%s, p=%s) selected %s", method, cfg.finetune.top_p,
                    {k: len(v) for k, v in selected.items()})  # fmt: skip
    trained, total = trained_parameters(cfg)
    names = moe_layer_names(m.num_hidden_layers, m.first_k_dense_replace, m.num_nextn_predict_layers)
    holder: dict[str, Any] = {}

    def build() -> FinetuneTrainer:
        holder["trainer"] = FinetuneTrainer(make(cfg), cfg, general_batches, names)
        return holder["trainer"]

    result = pretrain(cfg, data_dir, output, progress=progress, run_name=run_name or f"finetune/{method}",
                      experiment=experiment, trainer=build)  # fmt: skip
    general_after = holder["trainer"].general_losses.get(result.steps) if general_batches else None
    tuned = open_checkpoint(result.checkpoint)
    saved = sum(tuned.info(n).nbytes for n in tuned.names() if not n.startswith(OPTIMIZER_PREFIX))
    delta = None
    if save_delta:
        delta = str(Path(output) / DELTA_DIR)
        meta = write_delta(result.checkpoint, reader.location, delta, {"method": method, "selected": selected})
        saved = meta["bytes"]
    out = FinetuneResult(
        method=method, checkpoint=result.checkpoint, steps=result.steps, domain_loss=result.val_loss,
        domain_loss_before=before["domain"], general_loss=general_after, general_loss_before=before["general"],
        trained_params=trained, total_params=total, saved_bytes=saved, delta=delta,
        seconds=time.perf_counter() - t0, selected=selected, run_id=result.run_id,
    )  # fmt: skip
    (Path(output) / "finetune.json").write_text(json.dumps({**dataclasses.asdict(out), "scores": scores}, indent=1))
    return out


def _main(args: argparse.Namespace) -> int:
    from raymoe.actors.runtime import GraphError
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.config import ConfigError
    from raymoe.platform.data.shards import DataError
    from raymoe.platform.storage import StorageError

    try:
        r = run_finetune(args.base, args.data, args.method, args.output, args.runner, args.general, args.steps,
                         args.lr, args.overrides, args.top_p, args.bias_update, args.save_delta, args.run_name,
                         args.experiment, progress=not args.no_progress)  # fmt: skip
    except (ConfigError, CheckpointError, DataError, StorageError) as exc:
        print(f"raymoe finetune: {exc}", file=sys.stderr)
        return 2
    except GraphError as exc:
        print(f"raymoe finetune: the actor graph failed: {exc}", file=sys.stderr)
        return 1
    general = (f", general loss {r.general_loss_before:.3f} -> {r.general_loss:.3f}"
               if r.general_loss is not None else " (no --general: forgetting not measured)")  # fmt: skip
    print(f"fine-tuned ({r.method}) {r.steps} steps in {r.seconds:.0f} s: domain loss {r.domain_loss_before:.3f} -> "
          f"{r.domain_loss:.3f}{general}\ntrained {r.trained_params:,} of {r.total_params:,} parameters "
          f"({100 * r.trained_params / r.total_params:.1f} %)")  # fmt: skip
    if r.selected:
        print("ESFT experts per MoE layer: " + "; ".join(f"{k}: {v}" for k, v in r.selected.items()))
    print(f"checkpoint: {r.checkpoint}")
    if r.delta:
        print(f"delta: {r.delta} ({r.saved_bytes / 2**20:.2f} MiB)")
    print(f"MLflow run: {r.run_id}")
    return 0


if __name__ == "__main__":
    from raymoe.pipelines.cli import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
