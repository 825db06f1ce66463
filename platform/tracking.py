"""MLflow tracking of one training run, which a tracking server that is down cannot stop.

:class:`Tracker` logs the resolved config as params, per-step metrics (loss, MTP loss, tokens/s,
learning rate, gradient norm, per-layer MaxVio, bias range), validation metrics, and at the end
three plots (the main training loss against the validation loss with the training objective
apart, the expert load of the first and last steps, load and bias per expert over time) and the
final checkpoint's location, which a finished run registers as a Model Registry version. It
talks to MLflow through an explicit :class:`mlflow.MlflowClient` and a run id, never the fluent
active-run state, so two trackers coexist in one process.

Where the data goes: ``TrackingConfig.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file
``mlruns.db`` in the working directory. Artifacts of a SQLite store go to ``mlruns/`` next to
the database file (``mlruns/<experiment>/<run id>/artifacts``), never into whatever directory
the process runs in; the file store is not used (MLflow 3.17 refuses it by default).

Experiments it creates or reuses carry the tag ``mlflow.experimentKind=custom_model_development``
(:data:`EXPERIMENT_KIND_TAG`), so that MLflow 3's UI treats them as model training, not GenAI.

Failure handling: every MLflow call goes through :meth:`Tracker._guarded`. A failure is logged
once as a warning, the metric points are kept in a bounded buffer (the oldest are dropped
beyond ``max_buffered_points``) and sent again on a later call, at most once per retry
interval (doubling after every failed retry up to :data:`MAX_RETRY_INTERVAL_S`). During each
call MLflow's HTTP client is told not to retry (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``; it would
otherwise back off for minutes) and to give up on a silent server after
:data:`HTTP_TIMEOUT_S`; the variables are restored afterwards. At :meth:`Tracker.finish` the
tracker logs and returns (:class:`TrackingSummary`) what could not be sent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from raymoe.platform.config import TrackingConfig, config_to_dict, flatten
from raymoe.platform.plots import HEATMAP_FILE, LOSS_CURVE_FILE, TIMELINE_FILE, RunHistory

if TYPE_CHECKING:
    from raymoe.platform.train.trainer import StepMetrics

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DB_FILE = "mlruns.db"
DEFAULT_ARTIFACT_DIR = "mlruns"  # next to the SQLite file, as MLflow does for sqlite:///
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores (+driver allowed)

HTTP_MAX_RETRIES = 0  # our buffer retries; MLflow's own retries (7, with backoff) take minutes
HTTP_TIMEOUT_S = 5  # per request (connect and read) to a tracking server
RETRY_INTERVAL_S = 30.0  # first wait before trying a failing store again
MAX_RETRY_INTERVAL_S = 600.0  # the wait doubles after each failed retry, up to this
MAX_BUFFERED_POINTS = 10_000  # metric points kept while the store is unreachable

# MLflow's limits (mlflow/utils/validation.py)
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_CHARS = 6000
MAX_KEY_CHARS = 250

# MlflowException error codes meaning "the store answered and refused this data": the data is
# dropped, the store is not considered down
REJECTION_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"})

PLOTS_ARTIFACT_DIR = "plots"
CHECKPOINT_ARTIFACT_FILE = "checkpoint.txt"
CHECKPOINT_TAG = "checkpoint"
# The experiment tag MLflow 3's UI reads for an experiment's kind; "custom_model_development" is its
# "Machine learning" (model training) kind, "genai_development" its GenAI one (mlflow/server/js: the
# ExperimentKind enum). The other model-training kinds a user may have chosen are left as they are.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
TRAINING_KINDS = frozenset(
    {EXPERIMENT_KIND_TRAINING, "finetuning", "forecasting", "classification", "regression", "automl"}
)
MODEL_VERSION_TAG = "registered_model_version"  # run tag: models:/NAME/VERSION of its final checkpoint
MODEL_URI_PREFIX = "models:/"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PERPLEXITY_LOSS = 700.0  # exp() of more overflows a float64


# --------------------------------------------------------------------------- URIs and params


def resolve_tracking_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlruns.db``."""
    if uri:
        return uri
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return default_sqlite_uri(cwd)


def default_sqlite_uri(cwd: str | Path | None = None) -> str:
    """The default store: ``sqlite:////abs/dir/mlruns.db`` in ``cwd`` (the working directory)."""
    return f"sqlite:///{(Path(cwd or os.getcwd()) / DEFAULT_DB_FILE).absolute()}"


def is_database_uri(uri: str) -> bool:
    """Whether ``uri`` is a SQLAlchemy database URI (``sqlite:///…``, ``postgresql+psycopg2://…``)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    return scheme in DATABASE_SCHEMES


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix) :].split("?", 1)[0]).absolute()


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: ``mlruns/<experiment>/`` beside a SQLite file, else None.

    (None lets the store decide: a tracking server's ``--default-artifact-root``.) Run artifacts
    go to ``<that>/<run id>/artifacts``; the folder is next to the database, not in whatever
    directory the process happens to run in.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / DEFAULT_ARTIFACT_DIR / slug).as_uri()


def params_from_config(config: Any) -> dict[str, str]:
    """MLflow params of a config: a dataclass or (nested) dict, flattened to ``section.field``.

    Values become strings cut to MLflow's 6000 characters; keys over 250 characters are
    skipped with a warning.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = config_to_dict(config)
    out: dict[str, str] = {}
    for key, value in flatten(dict(config)).items():
        if len(key) > MAX_KEY_CHARS:
            logger.warning("MLflow param %r… is longer than %d characters; not logged", key[:40], MAX_KEY_CHARS)
            continue
        out[key] = str(value)[:MAX_PARAM_VALUE_CHARS]
    return out


def is_model_uri(location: str) -> bool:
    """Whether ``location`` names a Model Registry version: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    return str(location).startswith(MODEL_URI_PREFIX)


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """The checkpoint location a Model Registry version was registered with (its source).

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``models:/NAME@ALIAS``.
        tracking_uri: the store (default as :func:`resolve_tracking_uri`: ``$MLFLOW_TRACKING_URI``
            or ``mlruns.db`` in the working directory).

    Raises:
        ValueError: a malformed URI, or a name, version or alias the registry does not know
            (the message names the URI and the store).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = resolve_tracking_uri(tracking_uri)
    rest = uri[len(MODEL_URI_PREFIX) :] if is_model_uri(uri) else ""
    name, at, ref = rest.partition("@")
    if not at:
        name, _, ref = rest.partition("/")
    if not name or not ref or "/" in name or "/" in ref:
        raise ValueError(
            f"{uri!r} is not a model URI: use models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS"
        )
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        if at:
            found = client.get_model_version_by_alias(name, ref)
        elif ref == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"{uri}: model {name!r} has no versions in the registry at {store}")
            found = max(versions, key=lambda v: int(v.version))
        else:
            found = client.get_model_version(name, ref)
    except MlflowException as exc:
        raise ValueError(f"{uri}: not in the Model Registry at {store} ({_short(exc)})") from None
    return str(found.source)


def _to_numpy(x: Any) -> np.ndarray:
    """A float64 array of a tensor (any device or dtype), an array, a list or a number."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class _Point(NamedTuple):
    """One metric value, kept as plain data until it is sent (MLflow's ``Metric`` fields)."""

    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclasses.dataclass(kw_only=True)
class TrackingSummary:
    """What a tracker sent and what it could not send (returned by :meth:`Tracker.finish`)."""

    run_id: str | None
    uri: str
    sent_points: int = 0
    dropped_points: int = 0  # metric points never sent (buffer overflow, store down at the end)
    degraded: bool = False  # the store failed at least once
    model_version: str | None = None  # models:/NAME/VERSION of the registered final checkpoint
    lost: list[str] = dataclasses.field(default_factory=list)  # params, tags, artifacts not sent

    @property
    def warning(self) -> str | None:
        """One line saying what was lost, or None when everything arrived."""
        if not self.dropped_points and not self.lost:
            return None
        parts = ([_count(self.dropped_points, "metric points")] if self.dropped_points else []) + self.lost
        return f"MLflow tracking at {self.uri}: not sent: {', '.join(parts)}"


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """MLflow tracking of one training run (see the module docstring for failure handling).

    Args:
        cfg: ``uri`` (None: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db`` in the working
            directory), ``experiment`` name, ``enabled`` (False: every method is a no-op).
        run_name: the MLflow run name (MLflow picks one when None).
        experiment: overrides ``cfg.experiment``.
        tags: tags set on the run when it is created.
        run_id: continue this run (a resumed training) instead of creating one; when the store
            does not know it, a new run is created with a warning.
        register_as: a Model Registry name: :meth:`finish` of a FINISHED run registers its
            checkpoint as a new version of it (None or "": nothing is registered).
        retry_interval_s: first wait before a failing store is tried again.
        max_buffered_points: metric points kept while the store is unreachable.
        http_timeout_s: per-request timeout towards a tracking server.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str | None = None,
        experiment: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        *,
        register_as: str | None = None,
        retry_interval_s: float = RETRY_INTERVAL_S,
        max_buffered_points: int = MAX_BUFFERED_POINTS,
        http_timeout_s: float = HTTP_TIMEOUT_S,
    ) -> None:
        self.enabled = cfg.enabled
        self.uri = resolve_tracking_uri(cfg.uri) if cfg.enabled else ""
        self.experiment = experiment or cfg.experiment
        self.run_name = run_name
        self._create_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.register_as = register_as or None
        self._resume_id = run_id
        self._resumed = False  # whether the run existed before this process
        self._retry_interval_s = self._base_retry_s = retry_interval_s
        self._http_env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(HTTP_MAX_RETRIES),
                          "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(http_timeout_s)))}  # fmt: skip
        self._client: Any = None
        self._run_id: str | None = None
        self._started = self._finished = False
        self._failing = self._warned_down = False
        self._next_attempt = 0.0
        self._warned: set[str] = set()
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._points: deque[_Point] = deque()
        self._max_points = max_buffered_points
        self.summary = TrackingSummary(run_id=None, uri=self.uri)
        self.history = RunHistory()  # for the plots

    # ------------------------------------------------------------------ state

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (the resumed one while the store is still unreachable); None if none yet."""
        return self._run_id or self._resume_id

    @property
    def degraded(self) -> bool:
        """Whether the store failed at least once during this run."""
        return self.summary.degraded

    @property
    def dropped(self) -> int:
        """Metric points that could not be sent (so far)."""
        return self.summary.dropped_points

    @property
    def warning(self) -> str | None:
        """One line saying what could not be sent, or None."""
        return self.summary.warning

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        self.finish(status="FINISHED" if exc_type is None else "FAILED")

    # ------------------------------------------------------------------ public API

    def start(self, params: Any = None) -> None:
        """Create (or resume) the run and log ``params``: a config dataclass or a (nested, flat) dict."""
        if not self.enabled:
            return
        self._started = True
        self._pending_params.update(params_from_config(params or {}))
        self._flush(force=True)

    def log_step(self, metrics: StepMetrics) -> None:
        """Log one optimizer step's metrics at ``metrics.step`` and keep its loss and loads for the plots."""
        if not self.enabled:
            return
        m = metrics
        values: dict[str, float | None] = {
            "loss": m.loss, "main_loss": m.main_loss, "mtp_loss": m.mtp_loss, "aux_loss": m.aux_loss, "lr": m.lr,
            "grad_norm": m.grad_norm, "tokens_per_s": m.tokens_per_s, "bias/min": m.bias_min, "bias/max": m.bias_max,
        }  # fmt: skip
        max_vio_L = _to_numpy(metrics.max_vio).reshape(-1)
        values.update({f"maxvio/layer_{i}": v for i, v in enumerate(max_vio_L.tolist())})
        if max_vio_L.size:
            values["maxvio/mean"] = float(max_vio_L.mean())
        # the actor graph's per-actor compute/wait seconds and per-shard token counts
        values.update({k: float(v) for k, v in metrics.extra.items() if isinstance(v, (int, float))})
        biases = None if metrics.biases is None else _to_numpy(metrics.biases)
        self.history.add_step(metrics.step, metrics.loss, _to_numpy(metrics.loads), metrics.main_loss, biases)
        self.log_metrics(values, metrics.step)

    def log_eval(self, step: int, val_loss: float, maxvio_global: Any) -> None:
        """Log validation loss, perplexity and MaxVio_global per MoE layer (``[layers]``) and their mean."""
        if not self.enabled:
            return
        val_loss = float(val_loss)
        perplexity = math.exp(val_loss) if val_loss < MAX_PERPLEXITY_LOSS else None  # None for NaN too
        values: dict[str, float | None] = {"val/loss": val_loss, "val/perplexity": perplexity}
        vio_L = _to_numpy(maxvio_global).reshape(-1)
        values.update({f"val/maxvio_global/layer_{i}": v for i, v in enumerate(vio_L.tolist())})
        if vio_L.size:
            values["val/maxvio_global"] = float(vio_L.mean())
        self.history.add_eval(step, val_loss)
        self.log_metrics(values, step)

    def log_metrics(self, values: Mapping[str, float | None], step: int) -> None:
        """Log any metrics at ``step`` (None values are skipped); buffered while the store is down."""
        if not self.enabled:
            return
        now_ms = int(time.time() * 1000)
        for key, value in values.items():
            if value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                self._warn_once(f"value {key}", "metric %r: %r is not a number; not logged", key, value)
                continue
            if len(self._points) >= self._max_points:
                self._points.popleft()
                self.summary.dropped_points += 1
                self._warn_once("overflow", "MLflow buffer full (%d points): dropping the oldest", self._max_points)
            self._points.append(_Point(key, value, now_ms, int(step)))
        self._started = True  # logging without start() creates the run without params
        self._flush()

    def set_tag(self, key: str, value: Any) -> None:
        """Set a run tag (sent with the next successful call if the store is down)."""
        if not self.enabled:
            return
        self._pending_tags[str(key)] = str(value)[:MAX_PARAM_VALUE_CHARS]
        self._started = True
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """Upload a local file or folder to the run's artifacts; False (and noted) when it could not be."""
        if not self.enabled:
            return False
        return self._artifact_call(
            f"artifact {Path(path).name}", lambda c: c.log_artifact(self._run_id, str(path), artifact_path)
        )

    def log_text(self, text: str, artifact_file: str) -> bool:
        """Write ``text`` as the artifact ``artifact_file`` (e.g. ``notes/summary.txt``)."""
        if not self.enabled:
            return False
        return self._artifact_call(f"artifact {artifact_file}", lambda c: c.log_text(self._run_id, text, artifact_file))

    def finish(self, status: str = "FINISHED", checkpoint: str | None = None) -> TrackingSummary:
        """Send what is buffered, log the plots and the checkpoint's location, end the run.

        Args:
            status: the run's final status: FINISHED, FAILED or KILLED.
            checkpoint: where the final checkpoint is (a path or URI); tag ``checkpoint`` and the
                artifact ``checkpoint.txt``.

        Returns:
            The :class:`TrackingSummary` (also ``self.summary``); what was lost is logged as a warning.
        """
        if not self.enabled or self._finished:
            return self.summary
        if status not in RUN_STATUSES:
            raise ValueError(f"finish(status={status!r}): status must be one of {', '.join(RUN_STATUSES)}")
        self._finished = True
        if not self._started:
            return self.summary
        if checkpoint:
            self._pending_tags[CHECKPOINT_TAG] = str(checkpoint)[:MAX_PARAM_VALUE_CHARS]
        if self._flush(force=True):
            if checkpoint:
                self.log_text(f"{checkpoint}\n", CHECKPOINT_ARTIFACT_FILE)
            self._log_plots()
            if checkpoint and self.register_as and status == "FINISHED":
                self._register(str(checkpoint))
            self._flush(force=False)  # a tag an artifact call may have left behind
            state, _ = self._guarded("end run", lambda c: c.set_terminated(self._run_id, status=status))
            if state != "ok":
                self.summary.lost.append(f"run status {status}")
        else:  # the store is down: one attempt was made, no more
            self.summary.lost += [LOSS_CURVE_FILE, HEATMAP_FILE, TIMELINE_FILE] if self.history.steps else []
            self.summary.lost += [CHECKPOINT_ARTIFACT_FILE] if checkpoint else []
            if checkpoint and self.register_as and status == "FINISHED":
                self.summary.lost.append(f"model version of {self.register_as}")
        self._give_up_pending()
        if self.summary.warning:
            logger.warning("%s", self.summary.warning)
        return self.summary

    # ------------------------------------------------------------------ the Model Registry

    def _register(self, checkpoint: str) -> None:
        """Register ``checkpoint`` as a new version of ``register_as``, its source the checkpoint's location."""
        from mlflow.exceptions import MlflowException

        name = self.register_as
        if "://" not in checkpoint:  # a relative path would resolve against whoever reads the version
            checkpoint = os.path.abspath(checkpoint)

        def register(client: Any) -> Any:
            try:
                client.create_registered_model(name, description="raymoe training checkpoints")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            return client.create_model_version(name, source=checkpoint, run_id=self._run_id)

        state, result = self._guarded(f"register model {name}", register)
        if state != "ok":
            if state == "rejected":
                logger.warning("MLflow refused to register %s as model %r: %s", checkpoint, name, _short(result))
            self.summary.lost.append(f"model version of {name}")
            return
        self.summary.model_version = f"{MODEL_URI_PREFIX}{name}/{result.version}"
        self._pending_tags[MODEL_VERSION_TAG] = self.summary.model_version
        logger.info("registered %s as %s", checkpoint, self.summary.model_version)

    # ------------------------------------------------------------------ plots and loads

    def _earlier(self, key: str) -> list[tuple[int, float]]:
        """A resumed run's points of ``key`` logged before this process (for the plots)."""
        if not self._resumed:
            return []
        state, history = self._guarded(f"read {key}", lambda c: c.get_metric_history(self._run_id, key))
        return [(m.step, m.value) for m in history] if state == "ok" else []

    def _log_plots(self) -> None:
        with tempfile.TemporaryDirectory(prefix="raymoe-plots-") as tmp:
            files = []
            try:
                files = self.history.write(
                    tmp, self._earlier("loss"), self._earlier("val/loss"), self._earlier("main_loss")
                )
            except Exception as exc:  # a plot must never fail the run
                logger.warning("could not draw the training plots: %s", exc)
            for file in files:
                self.log_artifact(file, PLOTS_ARTIFACT_DIR)

    # ------------------------------------------------------------------ MLflow calls

    @contextmanager
    def _http_limits(self) -> Iterator[None]:
        """MLflow reads these at request time: no HTTP retries of its own, a short timeout."""
        saved = {key: os.environ.get(key) for key in self._http_env}
        os.environ.update(self._http_env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _may_try(self, force: bool) -> bool:
        return force or not self._failing or time.monotonic() >= self._next_attempt

    def _guarded(self, what: str, fn: Callable[[Any], Any], force: bool = False) -> tuple[str, Any]:
        """Run ``fn(client)``; never raise. Returns ``("ok", result)``, ``("rejected", exc)`` or ``("down", exc)``.

        "down" (store unreachable or failing) warns once and schedules the next attempt;
        "rejected" means the store answered and refused the data (the caller reports it).
        """
        if not self._may_try(force):
            return "down", None
        try:
            with self._http_limits():
                if self._client is None:
                    from mlflow import MlflowClient

                    self._client = MlflowClient(tracking_uri=self.uri)
                result = fn(self._client)
        except Exception as exc:
            if getattr(exc, "error_code", None) in REJECTION_CODES:
                return "rejected", exc
            self.summary.degraded = True
            if self._failing:
                self._retry_interval_s = min(2 * self._retry_interval_s, MAX_RETRY_INTERVAL_S)
            self._failing = True
            self._next_attempt = time.monotonic() + self._retry_interval_s
            if not self._warned_down:
                self._warned_down = True
                logger.warning(
                    "MLflow tracking at %s failed (%s: %s); training goes on, metrics are buffered and "
                    "retried after %.0f s (then less often)",
                    self.uri, what, _short(exc), self._retry_interval_s,
                )  # fmt: skip
            else:
                logger.debug("MLflow %s failed again: %s", what, _short(exc))
            return "down", exc
        if self._failing:
            self._failing = False
            self._retry_interval_s = self._base_retry_s
            logger.warning("MLflow tracking at %s reachable again; sending %d buffered points", self.uri,
                           len(self._points))  # fmt: skip
        return "ok", result

    def _ensure_run(self, force: bool) -> bool:
        """Create or resume the run if that has not happened yet; whether there is a run."""
        if self._run_id is not None:
            return True
        if self._resume_id is not None:
            state, result = self._guarded("resume run", lambda c: c.get_run(self._resume_id), force)
            if state == "down":
                return False
            if state == "ok":
                self._guarded("resume run", lambda c: c.update_run(self._resume_id, status="RUNNING"), force)
                mark = lambda c: self._mark_training(c, c.get_experiment(result.info.experiment_id))  # noqa: E731
                self._guarded("tag experiment", mark, force)
                self._drop_known_params(result.data.params)
                self._run_id = self.summary.run_id = self._resume_id
                self._resumed = True
                return True
            logger.warning("cannot resume MLflow run %s (%s); starting a new run", self._resume_id, _short(result))
            self._resume_id = None
        state, run_id = self._guarded("create run", self._create_run, force)
        if state == "ok":
            self._run_id = self.summary.run_id = run_id
            logger.info("MLflow run %s (experiment %r) at %s", run_id, self.experiment, self.uri)
        return state == "ok"

    def _create_run(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    self.experiment,
                    artifact_location=default_artifact_location(self.uri, self.experiment),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING},
                )
            except MlflowException as exc:  # another process created it meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
            self._mark_training(client, experiment)
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self._create_tags or None)
        return run.info.run_id

    def _mark_training(self, client: Any, experiment: Any) -> None:
        """Tag an existing experiment as model training unless it already has a training kind.

        An experiment created before this tag was set (or by another tool) would open in the
        GenAI view; a refusal only costs the view, never the run."""
        from mlflow.exceptions import MlflowException

        if experiment.tags.get(EXPERIMENT_KIND_TAG) in TRAINING_KINDS:
            return
        try:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING)
        except MlflowException as exc:
            logger.warning("could not mark MLflow experiment %r as model training: %s", self.experiment, _short(exc))

    def _drop_known_params(self, known: Mapping[str, str]) -> None:
        """A resumed run keeps its params; MLflow refuses changed values, so those are only reported."""
        changed = sorted(k for k, v in self._pending_params.items() if k in known and known[k] != v)
        if changed:
            logger.warning("resumed MLflow run keeps its earlier params; changed now: %s", ", ".join(changed))
        for key in [k for k in self._pending_params if k in known]:
            del self._pending_params[key]

    def _flush(self, force: bool = False) -> bool:
        """Send pending params, tags and metric points in MLflow-sized batches; whether all went out."""
        if not (self._pending_params or self._pending_tags or self._points or self._run_id is None):
            return True
        if not self._may_try(force) or not self._ensure_run(force):
            return False
        from mlflow.entities import Metric, Param, RunTag

        for kind, pending, entity, limit in (
            ("params", self._pending_params, Param, MAX_PARAMS_PER_BATCH),
            ("tags", self._pending_tags, RunTag, MAX_TAGS_PER_BATCH),
        ):
            while pending:
                keys = list(pending)[:limit]
                sent = self._send(f"log {kind}", {kind: [entity(k, pending[k]) for k in keys]}, force)
                if sent is None:
                    return False
                if not sent:
                    self.summary.lost.append(f"{_count(len(keys), kind)} (refused)")
                for key in keys:
                    del pending[key]
        while self._points:
            n = min(len(self._points), MAX_METRICS_PER_BATCH)
            batch = [Metric(*self._points[i]) for i in range(n)]
            sent = self._send("log metrics", {"metrics": batch}, force)
            if sent is None:
                return False
            for _ in range(n):
                self._points.popleft()
            if sent:
                self.summary.sent_points += n
            else:
                self.summary.dropped_points += n
        return True

    def _send(self, what: str, batch: dict[str, list], force: bool) -> bool | None:
        """One ``log_batch``: True sent, False refused by the store, None the store is down."""
        state, exc = self._guarded(what, lambda c: c.log_batch(self._run_id, synchronous=True, **batch), force)
        if state == "rejected":
            self._warn_once(f"refused {what}", "MLflow refused to %s: %s", what, _short(exc))
        return None if state == "down" else state == "ok"

    def _artifact_call(self, what: str, fn: Callable[[Any], Any]) -> bool:
        if not self._started or not self._ensure_run(force=False):
            self.summary.lost.append(what)
            return False
        state, exc = self._guarded(f"log {what}", fn)
        if state == "rejected":
            logger.warning("MLflow refused %s: %s", what, _short(exc))
        if state != "ok":
            self.summary.lost.append(what)
        return state == "ok"

    def _give_up_pending(self) -> None:
        """At the end, whatever is still buffered counts as lost."""
        self.summary.dropped_points += len(self._points)
        self._points.clear()
        for kind, pending in (("params", self._pending_params), ("tags", self._pending_tags)):
            if pending:
                self.summary.lost.append(_count(len(pending), kind))
                pending.clear()
        if self._run_id is None and self._started:
            self.summary.lost.insert(0, "the run itself")

    def _warn_once(self, kind: str, msg: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(msg, *args)


def _count(n: int, things: str) -> str:
    """``3 params``, ``1 param``."""
    return f"{n} {things if n != 1 else things.removesuffix('s')}"


def _short(exc: BaseException) -> str:
    """The first line of an exception's message, cut to a readable length."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
