"""The Helm chart deploy/helm/raymoe, rendered by Helm's own engine (helm_python binds Helm 4's Go
SDK, offline) and checked against KubeRay's CRD schemas, strictly, as `kubectl --validate=strict`
would: a field the CRD does not define is an error.

Value sets rendered throughout: the chart's defaults (with the RayService and the standalone
RayCluster switched on too, so that every kind is rendered), a GPU + S3 + autoscaling variant, and
every kind with the served API's key from a Secret.
"""

from __future__ import annotations

import argparse
import copy
import functools
import shlex
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "raymoe"
SERVE_CONFIG = REPO / "deploy" / "serve" / "config.yaml"
CRDS = REPO / "deploy" / "crds"  # vendored copies; CI runs on a fresh clone without ../shared
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"  # where they were copied from, when present
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
RELEASE, NAMESPACE = "demo", "ml"

GIB = 2**30
GPU_S3_AUTOSCALING: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/raymoe", "tag": "0.1.0-gpu"},
    "storage": {
        "checkpointUri": "s3://raymoe-ckpt/runs/",
        "s3": {"region": "us-east-1", "endpointUrl": "https://minio.storage:9000", "credentialsSecret": "raymoe-s3"},
        "volume": {"enabled": False},
    },
    "rayCluster": {
        "autoscaler": {"idleTimeoutSeconds": 300, "upscalingMode": "Conservative"},
        "head": {"cpu": "8", "memory": "32Gi", "objectStoreMemory": 8 * GIB, "rayStartParams": {"num-cpus": "0"}},
        "workerGroups": [
            {
                "name": "gpu",
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 8,
                "cpu": "32",
                "memory": "256Gi",
                "gpus": 8,
                "objectStoreMemory": 64 * GIB,
                "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        ],
    },
    "pretrain": {
        "name": "v3-run1",
        "preset": "small",
        "overrides": ["parallel.ep=4", "parallel.num_gpus_per_actor=1", "train.steps=5000"],
        "backoffLimit": 5,
        "runName": "v3 run 1",
        "runtimeEnv": {"env_vars": {"NCCL_DEBUG": "WARN"}},
    },
    "serve": {
        "enabled": True,
        "args": {"max_batch_size": 64, "speculative": False},
        "autoscaling": {"min_replicas": 0, "max_replicas": 16},
        "replicaResources": {"num_gpus": 1, "num_cpus": 4},
        "rayCluster": {
            "workerGroups": [
                {"name": "gpu-serve", "minReplicas": 0, "maxReplicas": 16, "cpu": "8", "memory": "64Gi", "gpus": 1}
            ]
        },
    },
    "cluster": {"enabled": True},
    "mlflow": {"backendStore": {"existingSecret": "mlflow-db"}, "artifactsDestination": "s3://raymoe-mlflow/artifacts"},
}
ALL_KINDS = {"serve": {"enabled": True}, "cluster": {"enabled": True}}
API_KEY_SECRET = {"name": "raymoe-api-key", "key": "token"}
WITH_API_KEY = {"serve": {"enabled": True, "apiKeySecret": API_KEY_SECRET}, "cluster": {"enabled": True}}
VALUE_SETS = {
    "defaults": {},
    "defaults-all-kinds": ALL_KINDS,
    "gpu-s3-autoscaling": GPU_S3_AUTOSCALING,
    "api-key-secret": WITH_API_KEY,
}


# --- rendering ----------------------------------------------------------------------------------


@functools.cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values``, NOTES.txt aside."""
    manifests = _chart().render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@functools.cache
def _rendered(key: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(VALUE_SETS[key]))


def objects(key: str, kind: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(o) for o in _rendered(key) if o["kind"] == kind]


def one(key: str, kind: str) -> dict[str, Any]:
    found = objects(key, kind)
    assert len(found) == 1, f"{key}: {len(found)} objects of kind {kind}"
    return found[0]


def render_error(values: dict[str, Any]) -> str:
    """The message Helm fails with for ``values`` (the test fails if it renders)."""
    with pytest.raises(helm_python.HelmError) as info:
        render(values)
    return str(info.value)


# --- strict CRD schemas -------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The schema with additionalProperties: false added to every object schema that lists its
    properties and neither allows extra ones nor preserves unknown fields (kubectl --validate=strict)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (match,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert match["served"], f"{kind} {version} is not served by this KubeRay"
    return jsonschema.Draft7Validator(strict(match["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict[str, Any]) -> list[str]:
    group, version = obj["apiVersion"].split("/")
    assert group == "ray.io", obj["apiVersion"]
    errors = validator(obj["kind"], version).iter_errors(obj)
    return sorted(f"{obj['kind']} {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_strict_schemas_reject_unknown_and_mistyped_fields() -> None:
    """The checker itself: a misspelled field and a wrong type in a rendered RayJob are caught."""
    job = one("defaults", "RayJob")
    assert crd_errors(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("'rayStartParam' was unexpected" in e for e in crd_errors(typo))
    nested = copy.deepcopy(job)
    nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("'resource' was unexpected" in e for e in crd_errors(nested))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["backoffLimit"] = "2"
    assert any("backoffLimit" in e and "not of type 'integer'" in e for e in crd_errors(wrong_type))
    bad_quantity = copy.deepcopy(job)
    bad_quantity["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"
    ] = "2 cores"
    assert crd_errors(bad_quantity)


# --- every Ray object against its CRD ------------------------------------------------------------


@pytest.mark.parametrize("key", VALUE_SETS)
def test_ray_objects_validate_against_the_crds(key: str) -> None:
    ray_objects = [o for o in _rendered(key) if o["apiVersion"].startswith("ray.io/")]
    expected = {"defaults": {"RayJob"}}.get(key, {"RayJob", "RayService", "RayCluster"})
    assert {o["kind"] for o in ray_objects} == expected
    for obj in ray_objects:
        assert crd_errors(obj) == [], obj["metadata"]["name"]


def test_vendored_crds_are_the_shared_ones() -> None:
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} is not here (a fresh clone): the vendored copies are used")
    for name in CRD_FILES.values():
        assert (CRDS / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), name


def test_defaults_render_the_job_and_mlflow_only() -> None:
    kinds = sorted(o["kind"] for o in _rendered("defaults"))
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PersistentVolumeClaim", "RayJob", "Service"]


# --- the pretraining RayJob ----------------------------------------------------------------------


def pretrain_parser() -> argparse.ArgumentParser:
    """The real `raymoe pretrain` argument parser (pipelines/pretrain.py)."""
    from raymoe.pipelines import pretrain

    parser = argparse.ArgumentParser(prog="raymoe", exit_on_error=False)
    pretrain.register(parser.add_subparsers(dest="command"))
    return parser


def parse_entrypoint(job: dict[str, Any]) -> argparse.Namespace:
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "raymoe.pipelines.pretrain"], words
    return pretrain_parser().parse_args(["pretrain", *words[3:]])


def test_job_entrypoint_defaults() -> None:
    job = one("defaults", "RayJob")
    args = parse_entrypoint(job)
    assert (args.preset, args.overrides, args.trainer) == ("small", [], "graph")
    assert args.resume and args.no_progress
    assert args.output == "/mnt/raymoe/outputs/pretrain"
    spec = job["spec"]
    assert spec["backoffLimit"] == 2 and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 600 and spec["submissionMode"] == "K8sJobMode"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env == {"env_vars": {"MLFLOW_TRACKING_URI": f"http://demo-raymoe-mlflow.{NAMESPACE}.svc:5000"}}
    # the output volume is mounted where --output points, in the head and every worker
    for pod in pod_specs(spec["rayClusterSpec"]):
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["data"] == "/mnt/raymoe"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims["data"] == "demo-raymoe-data"
    assert "demo-raymoe-data" in {o["metadata"]["name"] for o in objects("defaults", "PersistentVolumeClaim")}


def test_job_entrypoint_gpu_s3() -> None:
    job = one("gpu-s3-autoscaling", "RayJob")
    args = parse_entrypoint(job)
    # the chart's checkpoint URI first, the user's overrides after it (they win on a conflict)
    assert args.overrides == [
        "train.checkpoint_uri=s3://raymoe-ckpt/runs/v3-run1",
        "parallel.ep=4",
        "parallel.num_gpus_per_actor=1",
        "train.steps=5000",
    ]
    assert args.resume and args.run_name == "v3 run 1"  # quoted through the shell intact
    assert args.output == "/home/ray/outputs/v3-run1"  # no volume: a local output dir, checkpoints on S3
    assert job["metadata"]["name"] == "demo-raymoe-v3-run1"
    assert job["spec"]["backoffLimit"] == 5
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env == {"NCCL_DEBUG": "WARN", "MLFLOW_TRACKING_URI": f"http://demo-raymoe-mlflow.{NAMESPACE}.svc:5000"}


def test_job_overrides_are_shell_safe() -> None:
    values = {"pretrain": {"overrides": ["tracking.experiment=a b; rm -rf /", "train.steps=3"]}}
    args = parse_entrypoint(one_of(render(values), "RayJob"))
    assert args.overrides == ["tracking.experiment=a b; rm -rf /", "train.steps=3"]
    message = render_error({"pretrain": {"overrides": ["tracking.experiment=it's"]}})
    assert "single quote" in message


def one_of(rendered: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in rendered if o["kind"] == kind]
    return found


# --- cluster shape: resources, autoscaling, exposure ---------------------------------------------


def pod_specs(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def cluster_specs(key: str) -> dict[str, dict[str, Any]]:
    specs = {"job": one(key, "RayJob")["spec"]["rayClusterSpec"]}
    if objects(key, "RayService"):
        specs["service"] = one(key, "RayService")["spec"]["rayClusterConfig"]
        specs["cluster"] = one(key, "RayCluster")["spec"]
    return specs


def test_gpu_variant_shape() -> None:
    specs = cluster_specs("gpu-s3-autoscaling")
    job, service = specs["job"], specs["service"]
    assert job["enableInTreeAutoscaling"] is True
    assert job["autoscalerOptions"] == {"idleTimeoutSeconds": 300, "upscalingMode": "Conservative"}
    assert job["authOptions"] == {"mode": "token"} and job["rayVersion"] == "2.60.0"
    head = job["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "object-store-memory": str(8 * GIB)}
    (gpu,) = job["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == ("gpu", 1, 1, 8)
    assert gpu["rayStartParams"] == {"object-store-memory": str(64 * GIB)}
    container = gpu["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/raymoe:0.1.0-gpu"
    for side in ("requests", "limits"):
        assert container["resources"][side] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 8}
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"secretRef": {"name": "raymoe-s3"}} in container["envFrom"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AWS_DEFAULT_REGION"] == "us-east-1" and env["AWS_ENDPOINT_URL"] == "https://minio.storage:9000"
    assert all(v["name"] != "data" for pod in pod_specs(job) for v in pod["volumes"])  # volume off
    # the service's own worker groups replace the default list; the head is the shared one
    (serve_group,) = service["workerGroupSpecs"]
    assert (serve_group["groupName"], serve_group["replicas"], serve_group["maxReplicas"]) == ("gpu-serve", 0, 16)
    serve_container = serve_group["template"]["spec"]["containers"][0]
    assert serve_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert service["headGroupSpec"]["rayStartParams"] == head["rayStartParams"]
    assert specs["cluster"]["workerGroupSpecs"] == job["workerGroupSpecs"]


def test_zero_and_false_overrides_apply() -> None:
    """A workload's override of 0 or false wins over the shared shape (sprig's merge would drop it)."""
    values = {
        "rayCluster": {"head": {"gpus": 1}},
        "pretrain": {"rayCluster": {"enableInTreeAutoscaling": False, "head": {"gpus": 0}}},
    }
    spec = one_of(render(values), "RayJob")["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    assert "nvidia.com/gpu" not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("key", VALUE_SETS)
def test_nothing_is_exposed_outside_the_cluster(key: str) -> None:
    for service in objects(key, "Service"):
        assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]
    for name, spec in cluster_specs(key).items():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
        assert "enableIngress" not in spec["headGroupSpec"], name


@pytest.mark.parametrize("key", VALUE_SETS)
def test_every_ray_container_points_at_mlflow(key: str) -> None:
    (service,) = [s for s in objects(key, "Service") if s["metadata"]["name"] == "demo-raymoe-mlflow"]
    port = service["spec"]["ports"][0]["port"]
    uri = f"http://demo-raymoe-mlflow.{NAMESPACE}.svc:{port}"
    for name, spec in cluster_specs(key).items():
        for pod in pod_specs(spec):
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["MLFLOW_TRACKING_URI"] == uri, name
    # MLflow answers that Host header (it rejects unknown ones) and localhost (kubectl port-forward)
    mlflow = one(key, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"demo-raymoe-mlflow.{NAMESPACE}.svc:*" in allowed and "localhost:*" in allowed
    assert mlflow["args"][:4] == ["--host", "0.0.0.0", "--port", str(port)]


def test_mlflow_store_sqlite_on_a_pvc_or_a_secret() -> None:
    deployment = one("defaults", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////mlflow/mlflow.db"
    assert pod["volumes"] == [{"name": "store", "persistentVolumeClaim": {"claimName": "demo-raymoe-mlflow"}}]
    assert deployment["spec"]["strategy"]["type"] == "Recreate" and deployment["spec"]["replicas"] == 1
    # the database URI from a Secret, artifacts on S3: no PVC at all
    variant = one("gpu-s3-autoscaling", "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in variant["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"] == "s3://raymoe-mlflow/artifacts"
    assert "volumes" not in variant
    assert objects("gpu-s3-autoscaling", "PersistentVolumeClaim") == []


# --- the RayService's serve config: one source of truth ------------------------------------------


def local_serve_config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def with_overrides(config: dict[str, Any], checkpoint: str, args=None, autoscaling=None, actor=None) -> dict[str, Any]:  # noqa: ANN001
    """deploy/serve/config.yaml with the chart's documented overrides applied (values.yaml, serve.*)."""
    config = copy.deepcopy(config)
    app = config["applications"][0]
    app["args"] = {**app["args"], "checkpoint": checkpoint, **(args or {})}
    deployment = app["deployments"][0]
    deployment["autoscaling_config"] = {**deployment["autoscaling_config"], **(autoscaling or {})}
    deployment["ray_actor_options"] = {**deployment["ray_actor_options"], **(actor or {})}
    return config


def test_chart_reads_the_serve_config_file() -> None:
    assert (CHART / "files" / "serve-config.yaml").resolve() == SERVE_CONFIG.resolve()


def test_serve_config_defaults_equal_the_local_file() -> None:
    rendered = yaml.safe_load(one("defaults-all-kinds", "RayService")["spec"]["serveConfigV2"])
    # the only change: the checkpoint, which is where the pretraining job writes
    assert rendered == with_overrides(local_serve_config(), checkpoint="/mnt/raymoe/outputs/pretrain")


def test_serve_config_variant_applies_the_overrides() -> None:
    service = one("gpu-s3-autoscaling", "RayService")
    rendered = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve = GPU_S3_AUTOSCALING["serve"]
    expected = with_overrides(
        local_serve_config(),
        checkpoint="s3://raymoe-ckpt/runs/v3-run1",
        args=serve["args"],
        autoscaling=serve["autoscaling"],
        actor=serve["replicaResources"],
    )
    assert rendered == expected
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_serve_args_in_the_values_schema_are_the_config_args() -> None:
    """serve.args accepts exactly the builder args of deploy/serve/config.yaml (checkpoint aside):
    when that file gains an arg, values.schema.json must learn it too."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    schema_args = set(schema["properties"]["serve"]["properties"]["args"]["properties"])
    config_args = set(local_serve_config()["applications"][0]["args"]) - {"checkpoint"}
    assert schema_args == config_args


# --- the served API's key, from a Secret ---------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_api_key_comes_from_the_secret_into_the_serving_containers_only() -> None:
    service = one("api-key-secret", "RayService")
    for pod in pod_specs(service["spec"]["rayClusterConfig"]):  # the head and every worker: replicas go anywhere
        env = _env(pod["containers"][0])
        assert env["RAYMOE_API_KEY"] == {"name": "RAYMOE_API_KEY", "valueFrom": {"secretKeyRef": API_KEY_SECRET}}
        assert "MLFLOW_TRACKING_URI" in env  # the shared environment is still there
    for kind in ("RayJob", "RayCluster"):
        obj = one("api-key-secret", kind)
        spec = obj["spec"].get("rayClusterSpec", obj["spec"])
        assert all("RAYMOE_API_KEY" not in _env(pod["containers"][0]) for pod in pod_specs(spec)), kind
    for key in ("defaults-all-kinds", "gpu-s3-autoscaling"):  # no Secret: no key, and nothing requires one
        spec = one(key, "RayService")["spec"]
        assert all("RAYMOE_API_KEY" not in _env(pod["containers"][0]) for pod in pod_specs(spec["rayClusterConfig"]))
        assert "require_api_key" not in yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]


def test_with_the_secret_every_replica_requires_the_key() -> None:
    """serveConfigV2 asks the replicas to refuse to start without the key (never a silently open API), and
    its args are the app's own: ServeArgs accepts them."""
    from raymoe.pipelines.serve import ServeArgs

    config = yaml.safe_load(one("api-key-secret", "RayService")["spec"]["serveConfigV2"])
    args = config["applications"][0]["args"]
    assert args == {**local_serve_config()["applications"][0]["args"], "checkpoint": "/mnt/raymoe/outputs/pretrain",
                    "require_api_key": True}  # fmt: skip
    assert ServeArgs(**args).require_api_key is True
    notes = _chart().render(copy.deepcopy(WITH_API_KEY), name=RELEASE, namespace=NAMESPACE)
    (text,) = [t for path, t in notes.items() if path.endswith("NOTES.txt")]
    assert "kubectl get secret raymoe-api-key" in text and '-H "Authorization: Bearer $RAYMOE_API_KEY"' in text


# --- bad values fail with a clear message --------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"pretrain": {"preest": "tiny"}}, "additional properties 'preest' not allowed"),
        ({"serve": {"autoscaling": {"max_replica": 3}}}, "additional properties 'max_replica' not allowed"),
        ({"serve": {"args": {"dtpye": "float32"}}}, "additional properties 'dtpye' not allowed"),
        ({"mlfow": {"enabled": False}}, "additional properties 'mlfow' not allowed"),
        ({"rayCluster": {"head": {"cpus": "2"}}}, "additional properties 'cpus' not allowed"),
        ({"pretrain": {"trainer": "grpah"}}, "/pretrain/trainer"),
        ({"pretrain": {"overrides": ["train.steps 200"]}}, "/pretrain/overrides/0"),
        ({"serve": {"apiKeySecret": {"nmae": "k", "key": "api-key"}}}, "additional properties 'nmae' not allowed"),
        ({"serve": {"apiKeySecret": {"name": "My_Secret", "key": "api-key"}}}, "/serve/apiKeySecret/name"),
        ({"serve": {"apiKeySecret": {"name": "k", "key": "api.key"}}}, "/serve/apiKeySecret/key"),
        ({"serve": {"apiKeySecret": "raymoe-api-key"}}, "/serve/apiKeySecret"),
    ],
)
def test_values_typos_fail(values: dict[str, Any], expected: str) -> None:
    assert expected in render_error(values)


def worker(**changes: Any) -> dict[str, Any]:
    return {"name": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "cpu": "4", "memory": "16Gi"} | changes


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"rayCluster": {"head": {"cpu": "2 cores"}}}, "/rayCluster/head/cpu"),
        ({"rayCluster": {"head": {"memory": "8GB"}}}, "/rayCluster/head/memory"),
        ({"rayCluster": {"workerGroups": [worker(gpus=-1)]}}, "/rayCluster/workerGroups/0/gpus"),
        ({"rayCluster": {"workerGroups": [worker(memory=0)]}}, "/rayCluster/workerGroups/0/memory"),
        ({"rayCluster": {"workerGroups": []}}, "/rayCluster/workerGroups"),
        ({"rayCluster": {"workerGroups": [worker(name="GPU_workers")]}}, "/rayCluster/workerGroups/0/name"),
        (
            {"rayCluster": {"workerGroups": [worker(minReplicas=3)]}},
            'worker group "cpu" has minReplicas 3 > maxReplicas 2',
        ),
        ({"rayCluster": {"workerGroups": [worker(replicas=5)]}}, 'worker group "cpu" has replicas 5 outside'),
        ({"rayCluster": {"workerGroups": [worker(), worker()]}}, 'two groups named "cpu"'),
        ({"serve": {"enabled": True, "autoscaling": {"min_replicas": 9}}}, "min_replicas 9 > max_replicas 4"),
        ({"serve": {"replicaResources": {"num_gpus": -1}}}, "/serve/replicaResources/num_gpus"),
        ({"storage": {"volume": {"size": "lots"}}}, "/storage/volume/size"),
    ],
)
def test_invalid_resource_settings_fail(values: dict[str, Any], expected: str) -> None:
    assert expected in render_error(values)


# --- helm lint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", VALUE_SETS)
def test_helm_lint_passes(key: str) -> None:
    report = helm_python.lint(CHART, copy.deepcopy(VALUE_SETS[key]), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_helm_set_flags_reach_the_entrypoint() -> None:
    """`--set 'pretrain.overrides={a=1,b=2}'` (as the README writes it) parses to a list of overrides."""
    values = helm_python.parse_set_string("pretrain.overrides={train.steps=300,train.checkpoint_every=50}")
    args = parse_entrypoint(one_of(render(values), "RayJob"))
    assert args.overrides == ["train.steps=300", "train.checkpoint_every=50"]


# --- the image -----------------------------------------------------------------------------------


def test_dockerfile_matches_the_chart_and_the_repo() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    ray_version = chart_values["rayVersion"]
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray_version}-py311\n" in dockerfile
    assert f"rayproject/ray:{ray_version}-py311-gpu" in dockerfile  # the documented GPU variant
    assert chart_values["image"]["tag"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    # torch pinned like `make install` does, and every copied source exists
    (torch_pin,) = [line for line in (REPO / "Makefile").read_text().splitlines() if "torch==" in line]
    assert f"ARG TORCH_VERSION={torch_pin.split('torch==')[1].strip()}\n" in dockerfile
    sources = [s for line in dockerfile.splitlines() if line.startswith("COPY ") for s in line.split()[2:-1]]
    assert sources and all((REPO / s).exists() for s in sources), sources
