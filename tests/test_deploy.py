"""The deploy files under platform/deploy/ are checked offline, with no cluster, no chart download and no network:

- every Kubernetes manifest validates against the Kubernetes schemas that `kubernetes-validate` ships (strict:
  an unknown field fails), and a broken manifest is rejected;
- the Dagster chart's values use only keys the chart documents (tests/fixtures/dagster-chart/), and the instance
  the chart renders from them has the run queue, pools, run monitoring and retries of platform/dagster.yaml,
  and loads in Dagster;
- the serving routing ConfigMap is read by the model server's own reader; its probes hit the app's routes;
- secrets are referenced (secretKeyRef, envSecrets, a Secret's name), never written;
- the Dockerfile copies files that exist and installs from uv.lock.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "platform" / "deploy"
K8S_DIR = DEPLOY / "k8s"
VALUES = DEPLOY / "helm" / "dagster-values.yaml"
CHART_SCHEMA = ROOT / "tests" / "fixtures" / "dagster-chart" / "values.subset.schema.json"
DOCKERFILE = DEPLOY / "Dockerfile"
PLATFORM_INSTANCE = ROOT / "platform" / "dagster.yaml"
# A Kubernetes release that kubernetes-validate ships schemas for (it ships 1.25 to 1.37).
K8S_VERSION = "1.33.0"


def manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_resources() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in manifest_files() for d in documents(p)]


def resource(kind: str, name: str) -> dict:
    found = [d for _, d in all_resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} under {K8S_DIR}, found {len(found)}"
    return found[0]


def k8s_validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


# --- Kubernetes manifests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,doc", all_resources(), ids=[n for n, _ in all_resources()])
def test_manifest_validates_against_the_kubernetes_schemas(name, doc):
    # SchemaNotFoundError (an unknown kind or apiVersion) fails the test too: nothing is skipped.
    k8s_validate(doc)


def test_each_service_has_its_manifests():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in all_resources()}
    assert {("ConfigMap", "lakefs-config"), ("Deployment", "lakefs"), ("Service", "lakefs"),
            ("Deployment", "mlflow"), ("Service", "mlflow"),
            ("ConfigMap", "serving-routing"), ("Deployment", "mlp-serving"), ("Service", "mlp-serving"),
            ("HorizontalPodAutoscaler", "mlp-serving"), ("ConfigMap", "mlp-settings")} <= kinds


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolize="Always"), "imagePullPolize"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="eighty"),
     "containerPort"),
    (lambda d: d["spec"].pop("selector"), "selector"),
], ids=["unknown-field", "wrong-type", "missing-required"])
def test_a_broken_manifest_is_rejected(mutate, where):
    import kubernetes_validate

    doc = copy.deepcopy(resource("Deployment", "mlp-serving"))
    k8s_validate(doc)  # the original passes, so the failure below is the mutation's
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        k8s_validate(doc)
    assert where in str(err.value.message) + ".".join(map(str, err.value.path))


def test_manifests_validate_with_the_network_cut_off(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"validation tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for _, doc in all_resources():
        k8s_validate(doc)


# --- Helm values against the chart's documented keys -----------------------------------------------------------

def chart_schema() -> dict:
    import json

    return json.loads(CHART_SCHEMA.read_text())


def chart_validator():
    import json

    import jsonschema
    import kubernetes_validate
    from importlib.resources import files
    from referencing import Registry, Resource

    defs_file = (files(kubernetes_validate) / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
                 / "_definitions.json")
    k8s_defs = json.loads(defs_file.read_text())
    registry = Registry().with_resource(k8s_defs["$id"], Resource.from_contents(k8s_defs))
    schema = chart_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _resolve(node: dict, schema: dict) -> dict:
    while "$ref" in node and node["$ref"].startswith("#/$defs/"):
        node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node


def _branches(node: dict, schema: dict) -> list[dict]:
    node = _resolve(node, schema)
    out = []
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in node.get(key, []):
            out += _branches(sub, schema)
    return out + [node]


def unknown_keys(value, node: dict, schema: dict, path: str = "") -> list[str]:
    """Key paths in `value` that the chart schema does not declare (or that enter a section not transcribed)."""
    branches = _branches(node, schema)
    if any(b.get("x-untranscribed") for b in branches):
        return [f"{path} (a chart section not transcribed in {CHART_SCHEMA.name}: transcribe it first)"]
    problems: list[str] = []
    if isinstance(value, dict):
        declared = [b["properties"] for b in branches if "properties" in b]
        if not declared:
            return []  # a free-form mapping in the chart (env, resources, labels, additionalInstanceConfig)
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            owners = [p[key] for p in declared if key in p]
            if not owners:
                problems.append(where)
            else:
                problems += unknown_keys(sub, owners[0], schema, where)
    elif isinstance(value, list):
        items = [b["items"] for b in branches if isinstance(b.get("items"), dict)]
        for i, sub in enumerate(value):
            if items:
                problems += unknown_keys(sub, items[0], schema, f"{path}[{i}]")
    return problems


def test_helm_values_validate_against_the_chart_schema():
    errors = sorted(chart_validator().iter_errors(values()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_every_helm_value_is_a_key_the_chart_documents():
    schema = chart_schema()
    assert unknown_keys(values(), schema, schema) == []


def test_a_misspelt_or_unknown_helm_key_is_caught():
    schema = chart_schema()
    bad = values()
    bad["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["maxConcurentRuns"] = 4
    bad["concurrency"]["runs"]["tagConcurrencyLimits"][0]["limits"] = 2
    bad["dagster-user-deployments"]["deployments"][0]["codeserverArgs"] = ["-f", "x.py"]
    bad["flower"] = {"enabled": True}
    assert unknown_keys(bad, schema, schema) == [
        "dagster-user-deployments.deployments[0].codeserverArgs",
        "dagsterDaemon.runCoordinator.config.queuedRunCoordinator.maxConcurentRuns",
        "concurrency.runs.tagConcurrencyLimits[0].limits",
        f"flower (a chart section not transcribed in {CHART_SCHEMA.name}: transcribe it first)",
    ]
    messages = [e.message for e in chart_validator().iter_errors(bad)]
    assert any("maxConcurentRuns" in m for m in messages), messages


def test_a_wrongly_typed_helm_value_is_caught():
    bad = values()
    bad["concurrency"]["runs"]["maxConcurrentRuns"] = "four"
    bad["dagster-user-deployments"]["deployments"][0]["resources"] = {"requests": {"cpu": ["1"]}}
    paths = {".".join(map(str, e.path)) for e in chart_validator().iter_errors(bad)}
    assert "concurrency.runs.maxConcurrentRuns" in paths
    assert any(p.startswith("dagster-user-deployments.deployments.0.resources") for p in paths), paths


# --- The instance the chart renders equals platform/dagster.yaml where it matters -----------------------------

def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _snake_keys(value):
    if isinstance(value, dict):
        return {_snake(k): _snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake_keys(v) for v in value]
    return value


def chart_instance(v: dict) -> dict:
    """The dagster.yaml the chart renders from our values (templates/configmap-instance.yaml and its
    `dagsterYaml.concurrency` helper), less storage, run launcher and compute logs, which need dagster-postgres and
    dagster-k8s. A chart block and an additionalInstanceConfig block of the same name would both be rendered:
    that is refused here."""
    daemon = v["dagsterDaemon"]
    out: dict = {"telemetry": {"enabled": v["telemetry"]["enabled"]}}
    rc = daemon["runCoordinator"]
    assert rc["enabled"] and rc["type"] == "QueuedRunCoordinator", "the run queue must be on"
    qrc = {k: val for k, val in (rc["config"].get("queuedRunCoordinator") or {}).items()
           if val is not None and val != []}
    out["run_coordinator"] = {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                              "config": _snake_keys(qrc)}
    conc = v.get("concurrency") or {}
    if conc.get("enabled"):
        rendered = {}
        pools = {k: val for k, val in (conc.get("pools") or {}).items() if val is not None}
        runs = {k: val for k, val in (conc.get("runs") or {}).items() if val is not None and val != []}
        if pools:
            rendered["pools"] = _snake_keys(pools)
        if runs:
            rendered["runs"] = {_snake(k): val for k, val in runs.items()}  # tag limits keep their own keys
        out["concurrency"] = rendered
    for chart_key, block in (("runMonitoring", "run_monitoring"), ("runRetries", "run_retries")):
        if (daemon.get(chart_key) or {}).get("enabled"):
            out[block] = _snake_keys(daemon[chart_key])
    for chart_key in ("sensors", "schedules"):
        if (daemon.get(chart_key) or {}).get("useThreads"):
            out[chart_key] = _snake_keys({k: val for k, val in daemon[chart_key].items() if val})
    extra = v.get("additionalInstanceConfig") or {}
    twice = sorted(set(extra) & set(out))
    assert not twice, f"{VALUES.name}: {twice} rendered both by the chart and by additionalInstanceConfig"
    return {**out, **extra}


def run_queue(instance: dict) -> dict:
    """Run queue and pools of a dagster.yaml, whichever of Dagster's two layouts it uses."""
    coordinator = (instance.get("run_coordinator") or {}).get("config") or {}
    runs = (instance.get("concurrency") or {}).get("runs") or {}
    pools = (instance.get("concurrency") or {}).get("pools") or {}
    return {"max_concurrent_runs": runs.get("max_concurrent_runs", coordinator.get("max_concurrent_runs")),
            "tag_concurrency_limits": runs.get("tag_concurrency_limits",
                                               coordinator.get("tag_concurrency_limits")) or [],
            "pools": pools, "dequeue_interval_seconds": coordinator.get("dequeue_interval_seconds")}


def test_helm_run_queue_and_pools_equal_platform_dagster_yaml():
    local = yaml.safe_load(PLATFORM_INSTANCE.read_text())
    assert run_queue(chart_instance(values())) == run_queue(local), (
        f"{VALUES.relative_to(ROOT)} and {PLATFORM_INSTANCE.relative_to(ROOT)} disagree on the run queue or pools")


@pytest.mark.parametrize("block", ["run_monitoring", "run_retries", "sensors", "schedules", "auto_materialize",
                                   "freshness", "telemetry"])
def test_helm_instance_block_equals_platform_dagster_yaml(block):
    local = yaml.safe_load(PLATFORM_INSTANCE.read_text())
    assert chart_instance(values()).get(block) == local.get(block)


def test_the_drift_check_sees_a_changed_limit():
    changed = values()
    changed["concurrency"]["runs"]["tagConcurrencyLimits"][0]["limit"] = 2
    local = yaml.safe_load(PLATFORM_INSTANCE.read_text())
    assert run_queue(chart_instance(changed)) != run_queue(local)


def test_the_instance_the_chart_renders_loads_in_dagster(tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(chart_instance(values())))
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_the_chart_refuses_our_values_if_both_places_set_the_run_limit():
    # The chart fails an install that sets the limit both in concurrency.runs and on the run coordinator.
    qrc = values()["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert qrc.get("maxConcurrentRuns") is None and not qrc.get("tagConcurrencyLimits")


# --- The code location, run pods and the image ------------------------------------------------------------------

def test_the_code_location_serves_our_definitions():
    (deployment,) = values()["dagster-user-deployments"]["deployments"]
    args = deployment["codeServerArgs"]
    definitions = args[args.index("-f") + 1]
    workdir = args[args.index("-d") + 1]
    assert (ROOT / definitions).is_file(), definitions
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    assert definitions == workspace["load_from"][0]["python_file"]["relative_path"]
    assert re.search(rf"^WORKDIR {re.escape(workdir)}$", DOCKERFILE.read_text(), re.M), workdir


def test_run_pods_get_the_code_locations_settings_and_secrets():
    v = values()
    (deployment,) = v["dagster-user-deployments"]["deployments"]
    launcher = v["runLauncher"]["config"]["k8sRunLauncher"]
    assert v["runLauncher"]["type"] == "K8sRunLauncher"
    assert launcher["envConfigMaps"] == deployment["envConfigMaps"]
    assert launcher["envSecrets"] == deployment["envSecrets"]
    for ref in deployment["envConfigMaps"]:
        resource("ConfigMap", ref["name"])  # exists among the manifests


def test_one_image_for_code_serving_and_mlflow():
    (deployment,) = values()["dagster-user-deployments"]["deployments"]
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    for name in ("mlp-serving", "mlflow"):
        (container,) = resource("Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image, name


def test_prod_settings_are_all_provided():
    """Every setting MLP_ENV=prod requires reaches the pods: from the ConfigMap, or, for a secret, from the Secret
    that README step 4 creates (the one the Helm values name)."""
    from resources.environment import ENV_VARS, PROD_REQUIRES

    settings = resource("ConfigMap", "mlp-settings")["data"]
    assert settings["MLP_ENV"] == "prod"
    secrets = {ENV_VARS["lakefs_access_key_id"], ENV_VARS["lakefs_secret_access_key"]}
    assert secrets & set(settings) == set()
    not_in_configmap = {ENV_VARS[n] for n in PROD_REQUIRES} - set(settings)
    assert secrets <= not_in_configmap
    readme = (ROOT / "README.md").read_text()
    (secret,) = {ref["name"] for ref in values()["dagster-user-deployments"]["deployments"][0]["envSecrets"]}
    command = re.search(rf"kubectl (?:-n \S+ )?create secret generic {secret}\b(.*?)(?:\n\n|```)", readme, re.S)
    assert command, f"README: no `kubectl create secret generic {secret}` command"
    assert {v for v in not_in_configmap if f"--from-literal={v}=" not in command.group(1)} == set()


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copies_files_that_exist_and_installs_from_the_lockfile():
    ins = dockerfile_instructions()
    copies = [rest.split() for op, rest in ins if op == "COPY"]
    sources = [src for parts in copies if not parts[0].startswith("--from") for src in parts[:-1]]
    assert sources and [s for s in sources if not (ROOT / s).exists()] == []
    assert "uv.lock" in sources and "pyproject.toml" in sources
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert re.search(r"uv sync --frozen", runs) and "uv lock" not in runs and "pip install --no-cache-dir \"uv" in runs
    # Every copied path passes the build context's ignore file.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert [s for s in sources if f"!{s}" not in ignore and f"!{s}/" not in ignore] == []


def test_dockerfile_runs_as_a_user_and_matches_the_project():
    ins = dockerfile_instructions()
    (base,) = [rest for op, rest in ins if op == "FROM"]
    users = [rest for op, rest in ins if op == "USER"]
    assert base == "python:3.11-slim"
    assert 'requires-python = ">=3.11,<3.12"' in (ROOT / "pyproject.toml").read_text()
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uv_pin = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f'"uv=={uv_pin}"' in DOCKERFILE.read_text()
    (cmd,) = [rest for op, rest in ins if op == "CMD"]
    assert "platform/definitions.py" in cmd and (ROOT / "platform" / "definitions.py").is_file()


DOWNLOADERS = re.compile(r"\b(pip|uv|curl|wget|apt-get|git|dbt deps)\b")


def test_nothing_is_installed_or_downloaded_when_a_container_starts():
    ins = dockerfile_instructions()
    (cmd,) = [rest for op, rest in ins if op == "CMD"]
    assert not [op for op, _ in ins if op == "ENTRYPOINT"] and not DOWNLOADERS.search(cmd)
    env = " ".join(rest for op, rest in ins if op == "ENV")
    for setting in ("UV_PYTHON_DOWNLOADS=never", "NML_DISABLE_USAGE_LOGGING=1", "DO_NOT_TRACK=1",
                    "DBT_SEND_ANONYMOUS_USAGE_STATS=false"):
        assert setting in env, setting
    for name, doc in all_resources():
        pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            line = " ".join(container.get("command", []) + container.get("args", []))
            assert not DOWNLOADERS.search(line), f"{name}: {line}"
    (deployment,) = values()["dagster-user-deployments"]["deployments"]
    assert not DOWNLOADERS.search(" ".join(deployment["codeServerArgs"]))


# --- Serving ---------------------------------------------------------------------------------------------------

def serving_container() -> dict:
    (container,) = resource("Deployment", "mlp-serving")["spec"]["template"]["spec"]["containers"]
    return container


def _arg(container: dict, name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return value


def test_the_routing_configmap_is_read_by_the_server(tmp_path):
    from mlplatform.serving.routing import CHALLENGER, Router, effective_routing, read_routing_file
    from mlplatform.serving.settings import RoutingSettings

    container = serving_container()
    routing_file = Path(_arg(container, "routing-file"))
    (mount,) = [m for m in container["volumeMounts"] if routing_file.parent == Path(m["mountPath"])]
    (volume,) = [v for v in resource("Deployment", "mlp-serving")["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == mount["name"]]
    assert "subPath" not in mount  # a subPath mount never sees a ConfigMap update
    data = resource("ConfigMap", volume["configMap"]["name"])["data"]
    path = tmp_path / routing_file.name
    path.write_text(data[routing_file.name])
    routing = effective_routing(RoutingSettings(), read_routing_file(path), {})
    assert (routing.mode, routing.canary_percent, routing.shadow, routing.kill_switch) == ("canary", 10, True, False)
    assert CHALLENGER in Router(routing, {"champion", "challenger"}).aliases_needed()


def test_a_bad_routing_configmap_is_refused(tmp_path):
    from mlplatform.errors import SettingError
    from mlplatform.serving.routing import effective_routing, read_routing_file
    from mlplatform.serving.settings import RoutingSettings

    data = yaml.safe_load(resource("ConfigMap", "serving-routing")["data"]["routing.yaml"])
    for change in ({"canary_percent": 150}, {"mode": "blue-green"}, {"variants": {"champion": -1}}):
        path = tmp_path / "routing.yaml"
        path.write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(SettingError, match="routing file"):
            effective_routing(RoutingSettings(), read_routing_file(path), {})


def test_serving_probes_hit_the_apps_health_routes(tmp_path):
    from mlplatform.serving.app import create_app
    from mlplatform.spec import load_spec
    from mlplatform.tracking import Tracking

    served = {e["name"]: e.get("value") for e in serving_container().get("env", [])}["MLP_DATASET"]
    assert served in resource("ConfigMap", "mlp-settings")["data"]["MLP_DATASETS"].split(",")
    spec = load_spec(served)
    app = create_app(spec, Tracking(f"sqlite:///{tmp_path / 'unused.db'}"), start=False, log_dir=tmp_path)
    routes = {r.path for r in app.routes if "GET" in getattr(r, "methods", set())}
    container = serving_container()
    port = int(_arg(container, "port"))
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "http"] == [port]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
        assert container[probe]["httpGet"]["port"] == "http"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 until the champion is loaded


def test_the_autoscaler_scales_the_serving_deployment():
    hpa = resource("HorizontalPodAutoscaler", "mlp-serving")["spec"]
    deployment = resource("Deployment", "mlp-serving")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mlp-serving"}
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert serving_container()["resources"]["requests"]["cpu"]  # CPU utilisation needs a request


# --- Secrets are referenced, never written ---------------------------------------------------------------------

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|CONNECTION_STRING|STORE_URI|CREDENTIAL", re.I)
SECRET_TEXT = [
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),  # a URI with a password in it
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # a setting whose name ends in password, secret, token or secret key, given a value (not a placeholder)
    re.compile(r"(?i)(?<![\w-])[\w-]*(?:password|passwd|secret|token|secret_?access_?key|secret_?key)[\"']?\s*[:=]\s*"
               r"[\"']?(?!<|\$|CHANGE-ME)[^\s\"'#]{6,}"),
]


def literal_secrets(path: str, text: str, docs: list[dict]) -> list[str]:
    found = [f"{path}: {m.group(0)!r}" for pattern in SECRET_TEXT for line in text.splitlines()
             if not line.lstrip().startswith("#") for m in [pattern.search(line)] if m]
    for doc in docs:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        if kind == "Secret":
            found.append(f"{path}: Secret/{name} (secrets are created by the operator, README step 1)")
        if kind == "ConfigMap":
            found += [f"{path}: ConfigMap/{name} key {k}" for k in doc.get("data", {}) if SECRET_NAME.search(k)]
        pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]) and "secretKeyRef" not in (env.get("valueFrom") or {}):
                    found.append(f"{path}: {kind}/{name} env {env['name']} is not a secretKeyRef")
            for arg in container.get("args", []) + container.get("command", []):
                if SECRET_NAME.search(arg.split("=")[0]):
                    found.append(f"{path}: {kind}/{name} argument {arg.split('=')[0]}")
    return found


def test_no_secret_is_written_in_the_deploy_files():
    found = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)] if path.suffix == ".yaml" else []
        found += literal_secrets(str(path.relative_to(ROOT)), text, docs)
    assert found == []
    # The Dagster storage password comes from a Secret the chart is told not to generate.
    v = values()
    assert v["generatePostgresqlPasswordSecret"] is False and v["global"]["postgresqlSecretName"]
    assert "postgresqlPassword" not in v["postgresql"]


def test_the_secret_scan_finds_a_written_secret():
    deployment = copy.deepcopy(resource("Deployment", "lakefs"))
    deployment["spec"]["template"]["spec"]["containers"][0]["env"][0] = {
        "name": "LAKEFS_DATABASE_POSTGRES_CONNECTION_STRING", "value": "postgres://lakefs:hunter22@db:5432/lakefs"}
    text = yaml.safe_dump(deployment)
    found = literal_secrets("lakefs.yaml", text, [deployment])
    assert any("not a secretKeyRef" in f for f in found) and any("hunter22" in f for f in found), found
    settings = copy.deepcopy(resource("ConfigMap", "mlp-settings"))
    settings["data"]["LAKEFS_SECRET_ACCESS_KEY"] = "abc"
    assert literal_secrets("settings.yaml", "", [settings]) == ["settings.yaml: ConfigMap/mlp-settings key "
                                                                "LAKEFS_SECRET_ACCESS_KEY"]
    for line in ("postgresqlPassword: s3cretpass", "LAKEFS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "token: 'abcdef12'"):
        assert literal_secrets("values.yaml", line, []) != [], line
    for line in ("postgresqlSecretName: dagster-postgresql-secret", "key: encrypt-secret-key",
                 "password: <the password>", "# password: hunter22"):
        assert literal_secrets("values.yaml", line, []) == [], line


def test_lakefs_uses_postgres_kv_and_an_s3_blockstore_with_secret_refs():
    config = yaml.safe_load(resource("ConfigMap", "lakefs-config")["data"]["config.yaml"])
    assert config["database"]["type"] == "postgres" and config["blockstore"]["type"] == "s3"
    (container,) = resource("Deployment", "lakefs")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert {"LAKEFS_DATABASE_POSTGRES_CONNECTION_STRING", "LAKEFS_AUTH_ENCRYPT_SECRET_KEY"} <= set(env)
    version = re.search(r"github\.com/treeverse/lakefs\s+v(\S+)",
                        (ROOT / "platform" / "lakefs" / "go.mod").read_text()).group(1)
    assert container["image"] == f"treeverse/lakefs:{version}"  # the release the tests run


def test_mlflow_server_has_postgres_s3_artifacts_and_allowed_hosts():
    (container,) = resource("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert _arg(container, "artifacts-destination").startswith("s3://")
    hosts = _arg(container, "allowed-hosts").split(",")
    assert "mlflow:5000" in hosts and "*" not in hosts
    assert resource("ConfigMap", "mlp-settings")["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


# --- README ----------------------------------------------------------------------------------------------------

def test_readme_walks_through_every_deploy_file():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Deploying to Kubernetes\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README: no '## Deploying to Kubernetes' section"
    text = section.group(1)
    mentioned = set(re.findall(r"platform/deploy/[\w./-]+\w", text))
    assert [m for m in sorted(mentioned) if not (ROOT / m).exists()] == []
    deploy_files = {str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert sorted(deploy_files - mentioned) == []
