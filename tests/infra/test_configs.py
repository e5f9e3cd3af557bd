"""The deployment configs under infra/ and prefect.yaml parse and point at things that exist.

Nothing here starts a container, a cluster or a Prefect server: each config is checked with
the tool's own validator where one ships in the environment (Ray's cluster-launcher schema,
Prefect's prefect.yaml model and flow-parameter validation, lvd's argparse parser), and the
fields lvd relies on (image, GPUs, shared volume, pinned torch) are compared across files.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CLUSTER = INFRA / "ray" / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
COMPOSE = INFRA / "prefect" / "docker-compose.yaml"
PREFECT_YAML = ROOT / "prefect.yaml"
README = INFRA / "README.md"
YAMLS = [CLUSTER, RAYCLUSTER, RAYJOB, COMPOSE, PREFECT_YAML]
POOL = "lvd-process"


def load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def by_kind(path: Path, kind: str) -> dict:
    (doc,) = [d for d in load_all(path) if d.get("kind") == kind]
    return doc


def parse_lvd(command: str):
    """Parse an `lvd ...` command line with lvd's own parser, without running it."""
    from lvd.cli.main import build_parser

    argv = shlex.split(command)
    assert argv[0] == "lvd", f"not an lvd command: {command!r}"
    parser = build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as e:  # argparse exits on unknown commands and flags
        raise AssertionError(f"lvd's parser refuses {command!r} (exit {e.code})") from None
    # argparse also takes abbreviations (--shard for --shard-size): configs spell flags out.
    (sub_action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    known = sub_action.choices[args.command]._option_string_actions
    flags = {t.split("=")[0] for t in argv[2:] if t.startswith("--")}
    assert flags <= set(known), f"{command!r}: not spelled as lvd spells them: {flags - set(known)}"
    return args


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, out, buf = DOCKERFILE.read_text().splitlines(), [], ""
    for line in lines:
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def k8s_containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def raycluster_groups() -> list[tuple[str, dict]]:
    spec = by_kind(RAYCLUSTER, "RayCluster")["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def image_refs() -> dict[str, str]:
    refs = {"ray/cluster.yaml": load_all(CLUSTER)[0]["docker"]["image"]}
    for name, group in raycluster_groups():
        for c in k8s_containers(group["template"]):
            refs[f"raycluster {name}/{c['name']}"] = c["image"]
    refs["compose prefect-server"] = load_all(COMPOSE)[0]["services"]["prefect-server"]["image"]
    return refs


# ---------------------------------------------------------------- all files


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    for doc in load_all(path):
        assert isinstance(doc, dict)


def test_one_image_everywhere():
    refs = image_refs()
    assert len(set(refs.values())) == 1, f"configs name different images: {refs}"
    image = next(iter(refs.values()))
    assert re.fullmatch(r"[\w.\-/:]+:[\w.\-]+", image), f"image {image!r} has no explicit tag"
    # The build command in the Dockerfile and the README tags the same image.
    assert f"-t {image} " in DOCKERFILE.read_text()
    assert image in README.read_text()


def test_env_vars_exist():
    """Env vars the configs set are read by lvd / Ray or are Prefect settings."""
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names  # Prefect 3's list of names

    text = "\n".join(p.read_text() for p in YAMLS)
    names = set(re.findall(r"\b((?:PREFECT|RAY)_[A-Z_]+)\b", text))
    assert {"RAY_ADDRESS", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"} <= names
    lvd_src = "\n".join(p.read_text() for p in (ROOT / "lvd").rglob("*.py"))
    assert "RAY_ADDRESS" in lvd_src and "PREFECT_API_URL" in lvd_src
    prefect_names = _get_valid_setting_names(Settings)
    unknown = sorted(n for n in names if n.startswith("PREFECT_") and n not in prefect_names)
    assert not unknown, f"not Prefect settings: {unknown}"
    ray_known = {"RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED", "RAY_HEAD_IP"}
    assert {n for n in names if n.startswith("RAY_")} <= ray_known


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_torch_and_installs_project():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    assert words[0] in ("ARG", "FROM") and "FROM" in words
    base = dict(ins)["FROM"]
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"pip install\b[^&;]*\btorch==2\.14\.1\b[^&;]*\btorchvision==0\.29\.1\b", runs)
    assert re.search(r"pip install \.(\s|$)", runs), "the project is not installed"
    assert "python3.11" in runs and ("cuda" in base.lower() or "BASE_IMAGE" in base)
    assert "nvidia/cuda" in {a.split("=")[0]: a for w, a in ins if w == "ARG"}["BASE_IMAGE"]
    copies = " ".join(a for w, a in ins if w == "COPY")
    assert "pyproject.toml" in copies and "lvd" in copies.split()
    # Same pins as the project itself.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(deps)


def test_dockerfile_runs_lvd_as_non_root():
    ins = dockerfile_instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(i for i, (w, _) in enumerate(ins) if w == "USER")
    entry = [(i, a) for i, (w, a) in enumerate(ins) if w == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0][0] > last_user
    assert json.loads(entry[0][1]) == ["lvd"]
    faiss = [a for w, a in ins if w == "ARG" and a.startswith("FAISS_PACKAGE=")]
    assert faiss == ["FAISS_PACKAGE=faiss-cpu"]


# ---------------------------------------------------------------- Ray cluster launcher


def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_all(CLUSTER)[0]
    validate_config(prepare_config(copy.deepcopy(raw)))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["gpus"] = 1  # not a field: the schema must say so
    with pytest.raises(Exception, match="gpus"):
        validate_config(prepare_config(bad))


def test_cluster_yaml_nodes_and_start_commands():
    cfg = load_all(CLUSTER)[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and {"head", "cpu_worker", "gpu_worker"} <= set(types)
    for name, node in types.items():
        assert "CPU" in node["resources"], f"{name}: CPU resources not set"
    assert types["gpu_worker"]["resources"].get("GPU", 0) >= 1
    assert "--gpus all" in types["gpu_worker"]["docker"]["worker_run_options"]
    assert "GPU" not in types["cpu_worker"]["resources"]
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    # The image's ENTRYPOINT is `lvd`; the launcher's `docker run IMAGE bash` needs it cleared.
    assert '--entrypoint=""' in cfg["docker"]["run_options"]
    assert "-v /data:/data" in cfg["docker"]["run_options"]


# ---------------------------------------------------------------- KubeRay


def test_raycluster_groups_resources_and_volume():
    docs = load_all(RAYCLUSTER)
    pvc = by_kind(RAYCLUSTER, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    rc = by_kind(RAYCLUSTER, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and len(docs) == 2
    groups = dict(raycluster_groups())
    assert set(groups) == {"head", "cpu-workers", "gpu-workers"}
    for name, group in groups.items():
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        if name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        for c in k8s_containers(group["template"]):
            res = c["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[part]), f"{name}: {part} lacks cpu/memory"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims.get(mounts.get("/data")) == pvc["metadata"]["name"], f"{name}: no shared /data"
    gpu = k8s_containers(groups["gpu-workers"]["template"])[0]["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1
    for name in ("head", "cpu-workers"):
        res = k8s_containers(groups[name]["template"])[0]["resources"]
        assert "nvidia.com/gpu" not in res["limits"]
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_a_real_lvd_curate_on_the_cluster():
    job = by_kind(RAYJOB, "RayJob")
    rc = by_kind(RAYCLUSTER, "RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert job["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode")
    args = parse_lvd(job["spec"]["entrypoint"])
    assert args.command == "curate"
    assert all(p.startswith("/data/") for p in args.input) and args.out.startswith("/data/")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env.values())


def test_parse_lvd_refuses_flags_that_do_not_exist():
    """The checker above fails on a typo or on flags lvd does not have (yet)."""
    assert parse_lvd("lvd curate --input a --out b --ray-address auto").ray_address == "auto"
    with pytest.raises(AssertionError, match="refuses"):
        parse_lvd("lvd curate --input a --out b --ray-adress auto")
    with pytest.raises(AssertionError, match="spelled"):
        parse_lvd("lvd curate --input a --out b --shard 10")  # argparse alone would take it
    with pytest.raises(AssertionError, match="refuses"):
        parse_lvd("lvd pretrain --shards s --out o --num-nodes 8")  # the flag is --nnodes


# ---------------------------------------------------------------- Prefect


def prefect_deployments() -> list:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(load_all(PREFECT_YAML)[0])
    assert model.deployments
    return model.deployments


def test_prefect_yaml_entrypoints_are_flows_with_valid_parameters():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    for dep in prefect_deployments():
        path, _, func = dep.entrypoint.partition(":")
        assert (ROOT / path).is_file(), f"{dep.name}: no file {path}"
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + func)
        assert isinstance(flow, Flow) and flow.name == func.removesuffix("_flow")
        sig = inspect.signature(flow.fn).parameters
        assert set(dep.parameters) <= set(sig), f"{dep.name}: unknown {set(dep.parameters) - set(sig)}"
        required = {n for n, p in sig.items() if p.default is inspect.Parameter.empty}
        assert required <= set(dep.parameters), f"{dep.name}: missing {required - set(dep.parameters)}"
        flow.validate_parameters(dep.parameters)  # pydantic: types match the signature
        assert dep.work_pool.name == POOL


def test_prefect_yaml_pull_step_and_inactive_schedule():
    from prefect.deployments.steps import pull

    raw = load_all(PREFECT_YAML)[0]
    (step,) = raw["pull"]
    ((name, kwargs),) = step.items()
    assert name == "prefect.deployments.steps.set_working_directory"
    assert set(kwargs) == {"directory"} and callable(pull.set_working_directory)
    schedules = [s for d in prefect_deployments() for s in (d.schedules or [])]
    assert schedules and all(s.cron and s.active is False for s in schedules)
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=schedules[0].cron, timezone=schedules[0].timezone)  # raises if invalid
    envs = {d.name: d.work_pool.job_variables.get("env", {}) for d in prefect_deployments()}
    assert envs["cluster"]["RAY_ADDRESS"] == "auto" and "RAY_ADDRESS" not in envs["local"]


def test_compose_server_uses_postgres():
    services = load_all(COMPOSE)[0]["services"]
    env = services["prefect-server"]["environment"]
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["prefect-server"]["command"][:2] == ["server", "start"]
    assert "postgres" in services["prefect-server"]["depends_on"]


def test_compose_publishes_loopback_only_with_required_secrets():
    """No port on every interface, API basic auth on, no password in the file: each secret is
    a `${VAR:?message}` reference, which docker compose refuses to start without."""
    text = COMPOSE.read_text()
    services = load_all(COMPOSE)[0]["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 2)
            assert len(host) == 3 and host[0] in ("127.0.0.1", "[::1]"), f"{name} publishes {port} on every interface"
    env = services["prefect-server"]["environment"]
    required = re.compile(r"\$\{(\w+):\?[^}]+\}")
    assert required.fullmatch(env["PREFECT_SERVER_API_AUTH_STRING"]), "API auth must come from a required variable"
    assert required.fullmatch(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    assert "${POSTGRES_PASSWORD:?" in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "CHANGE-ME" not in text and not re.search(r"PASSWORD:\s*[\w-]+\s*(#|$)", text, re.M)


# ---------------------------------------------------------------- README


LVD_CALL = re.compile(r"(?:^|[\s/])lvd(?::[\w.\-]+)? ([a-z]+\b.*)")


def readme_lvd_commands(text: str) -> list[str]:
    """lvd calls in the README's code blocks, direct (`lvd curate ...`, `-- lvd curate ...`)
    or through the image (`.../lvd:TAG curate ...`), comments dropped."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = [ln.split(" #")[0].strip() for b in blocks for ln in b.splitlines()]
    return ["lvd " + m.group(1).strip() for ln in lines if (m := LVD_CALL.search(ln))]


def test_readme_commands_exist():
    text = README.read_text()
    cmds = readme_lvd_commands(text)
    assert len(cmds) >= 4, f"README shows too few lvd commands: {cmds}"
    for cmd in cmds:
        parse_lvd(cmd)
    for cmd in (
        f"prefect work-pool create {POOL} --type process",
        "prefect deploy --all",
        f"prefect worker start --pool {POOL}",
        "prefect deployment run 'curate/local'",
        "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://",
        "prefect server start",
    ):
        assert cmd in text, f"README lacks {cmd!r}"
    for path in (DOCKERFILE, CLUSTER, RAYCLUSTER, RAYJOB, COMPOSE, PREFECT_YAML):
        assert str(path.relative_to(ROOT)) in text, f"README does not describe {path.name}"
