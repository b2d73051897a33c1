"""The deployment files under infra/ hang together: one image name everywhere (and it is the one
the Dockerfile documents and builds), one Ray version, RayJob entry points that exist, ConfigMap
configs that the job entry points accept, a CronJob that renames and creates the generation RayJob,
an MLflow server on PostgreSQL + S3 with basic auth, and a launcher config Ray itself validates.
Static checks: no Ray instance, no Docker, no Kubernetes."""
import configparser
import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
JOBS = ("train", "tune", "generate")


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kube_objects() -> list[dict]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_all(path)]


def find(kind: str, name: str) -> dict:
    matches = [doc for doc in kube_objects() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def documented_image() -> str:
    """The image name in the Dockerfile's header comment (`# Image: NAME`)."""
    found = re.findall(r"^# Image: (\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M)
    assert len(found) == 1, "infra/docker/Dockerfile must document its image as one '# Image: NAME' line"
    return found[0]


def cron_template() -> dict:
    """The RayJob the CronJob creates every day: a copy of rayjob-generate.yaml kept in a ConfigMap."""
    return yaml.safe_load(find("ConfigMap", "vaepipe-generate-rayjob")["data"]["rayjob.yaml"])


def rayjobs() -> dict[str, dict]:
    """Every RayJob manifest by where it comes from, the CronJob's template included."""
    jobs = {f"rayjob-{job}.yaml": load_all(KUBERAY / f"rayjob-{job}.yaml")[0] for job in JOBS}
    jobs["cronjob-generate.yaml (template)"] = cron_template()
    return jobs


def cluster_specs() -> dict[str, dict]:
    specs = {"raycluster.yaml": find("RayCluster", "vaepipe")["spec"]}
    specs.update({where: job["spec"]["rayClusterSpec"] for where, job in rayjobs().items()})
    return specs


def pod_templates(spec: dict) -> dict[str, dict]:
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]})
    return templates


def ray_containers(spec: dict):
    for group, template in pod_templates(spec).items():
        for container in template["spec"]["containers"]:
            yield group, container, template["spec"]


def test_every_yaml_file_under_infra_parses():
    paths = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert {p.relative_to(INFRA).as_posix() for p in paths} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml",
        "kuberay/rayjob-generate.yaml", "kuberay/configmaps.yaml", "kuberay/cronjob-generate.yaml",
        "ray-cluster.yaml", "mlflow/docker-compose.yaml"}
    for path in paths:
        docs = load_all(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_one_image_name_everywhere_and_it_is_the_documented_one():
    image = documented_image()
    name, _, tag = image.rpartition(":")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert name.endswith(project["name"]) and tag == project["version"], (
        f"the image is tagged with the project's version: {project['name']}:{project['version']}, not {image}")
    used = {}
    for where, spec in cluster_specs().items():
        for group, container, _ in ray_containers(spec):
            used[f"{where} {group}/{container['name']}"] = container["image"]
    for where, job in rayjobs().items():
        for container in job["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
            used[f"{where} submitter"] = container["image"]
    docker = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())["docker"]
    used.update({f"ray-cluster.yaml docker.{key}": docker[key]
                 for key in ("image", "head_image", "worker_image") if key in docker})
    assert len(used) >= 5 * 3 + 1  # head, cpu and gpu in five cluster specs, and the launcher
    assert {where: ref for where, ref in used.items() if ref != image} == {}
    # no other tag of the image in any infra file, comments and docs included
    mentions = {m for path in INFRA.rglob("*") if path.is_file()
                for m in re.findall(rf"\b{re.escape(name)}:[0-9][\w.\-]*\w", path.read_text())}
    assert mentions == {image}


def test_one_ray_version_everywhere():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    base_tag = re.search(r"^FROM rayproject/ray:(\S+)", dockerfile, re.M).group(1)
    ray_version = base_tag.split("-")[0]
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(ray_version)}"', dockerfile), "pip must keep the base image's Ray"
    assert {where: spec["rayVersion"] for where, spec in cluster_specs().items()} == {
        where: ray_version for where in cluster_specs()}


def test_dockerfile_builds_on_a_pinned_ray_image_and_installs_the_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert len(froms) == 1 and re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+(-\w+)?", froms[0]), froms
    assert "WORKDIR /app" in instructions
    assert re.search(r"pip install \.[ \"]", text), "the project is installed with `pip install .`"
    copied = {part.rstrip("/") for line in instructions if line.startswith("COPY ")
              for part in line.split()[1:-1] if not part.startswith("--")}
    packages = {p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied >= packages | {"pyproject.toml", "README.md"}, f"COPY misses {packages - copied}"
    assert all((ROOT / path).exists() for path in copied)
    # the build context filter keeps what is copied
    kept = {line[1:].rstrip("/") for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
            if line.startswith("!")}
    assert kept >= copied
    # no credentials baked in: no ENV/ARG named like one, no value that looks like a key
    for line in instructions:
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", line, re.I), line
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


def test_rayjob_entrypoints_run_existing_job_modules_with_their_configmap():
    configmaps = {doc["metadata"]["name"]: doc for doc in load_all(KUBERAY / "configmaps.yaml")}
    for where, job in rayjobs().items():
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), where
        module = words[2].removeprefix("jobs.")
        assert (ROOT / "jobs" / f"{module}.py").is_file(), f"{where}: jobs/{module}.py does not exist"
        assert words[3:] == ["--config", f"/config/{module}.yaml"], where
        assert job["spec"]["shutdownAfterJobFinishes"] is True, where
        # the driver runs on the head: /config is mounted there, from the job's ConfigMap
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/config")
        volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
        configmap = configmaps[volume["configMap"]["name"]]
        assert f"{module}.yaml" in configmap["data"], f"{where}: ConfigMap has no {module}.yaml"


def test_cluster_specs_autoscale_a_cpu_and_a_gpu_group_from_the_shared_environment():
    objects = kube_objects()
    claims = {doc["metadata"]["name"] for doc in objects if doc["kind"] == "PersistentVolumeClaim"}
    configmaps = {doc["metadata"]["name"] for doc in objects if doc["kind"] == "ConfigMap"}
    secret_example = (KUBERAY / "mlflow-secret.example.env").read_text()
    for where, spec in cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, where
        groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}, where
        for group in groups.values():
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where
        assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values()), where
        for group, container, pod in ray_containers(spec):
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            assert (gpus is not None and int(gpus) >= 1) == (group == "gpu"), f"{where} {group}"
            refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
            assert refs == {"vaepipe-env", "vaepipe-mlflow"}, f"{where} {group}"
            volumes = {v["name"]: v for v in pod["volumes"]}
            for mount in container["volumeMounts"]:
                volume = volumes[mount["name"]]
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps
            assert any(m["mountPath"] == "/data" for m in container["volumeMounts"]), f"{where} {group}"
    assert "vaepipe-env" in configmaps
    assert "create secret generic vaepipe-mlflow" in secret_example
    assert {doc["metadata"].get("namespace") for doc in objects if doc["kind"] != "Namespace"} == {"vaepipe"}


def test_secret_example_holds_placeholders_only():
    lines = [line for line in (KUBERAY / "mlflow-secret.example.env").read_text().splitlines()
             if line and not line.startswith("#")]
    values = dict(line.split("=", 1) for line in lines)
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(values)
    assert values["MLFLOW_TRACKING_PASSWORD"] == "CHANGE-ME"
    assert not [p for p in KUBERAY.glob("*.yaml") if any(d["kind"] == "Secret" for d in load_all(p))], (
        "no Secret manifest in infra/kuberay: `kubectl apply -f infra/kuberay/` must never apply placeholders")


@pytest.fixture
def configmap_configs(tmp_path) -> dict[str, Path]:
    """The configs in configmaps.yaml, written out as the files the RayJobs mount at /config."""
    paths = {}
    for doc in load_all(KUBERAY / "configmaps.yaml"):
        for key, text in doc["data"].items():
            if key.endswith(".yaml"):
                paths[key.removesuffix(".yaml")] = tmp_path / key
                paths[key.removesuffix(".yaml")].write_text(text)
    assert set(paths) == set(JOBS)
    return paths


def tracking_uri_env() -> str:
    return find("ConfigMap", "vaepipe-env")["data"]["MLFLOW_TRACKING_URI"]


def test_configmap_configs_pass_the_job_entry_points(configmap_configs, monkeypatch):
    """`python -m jobs.X --config /config/X.yaml` with each ConfigMap's file: the entry point's own
    parsing and validation run; only the pipeline call itself is replaced by a recorder."""
    import jobs.train
    import jobs.tune
    from pipelines import workflows
    from pipelines.training.config import TrainConfig
    from pipelines.training.search_config import TuneConfig

    seen = {}

    def record(key, result=None):
        def pipeline(arg):
            seen[key] = arg
            return result(arg) if result else {}
        return pipeline

    monkeypatch.setattr(jobs.train, "run_training", record("train"))
    monkeypatch.setattr(workflows, "run_search", record("tune", lambda config: {
        "best": {"run_id": "r1"}, "parent_run_id": "p1", "tracking_uri": config.base.tracking.tracking_uri}))
    monkeypatch.setattr(workflows, "set_run_tag", lambda *args: None)
    monkeypatch.setattr(workflows, "register_run", record("register"))
    assert jobs.train.main(["--config", str(configmap_configs["train"])]) == 0
    assert jobs.tune.main(["--config", str(configmap_configs["tune"])]) == 0

    train, tune = seen["train"], seen["tune"]
    assert isinstance(train, TrainConfig) and isinstance(tune, TuneConfig)
    assert train.tracking.tracking_uri == tune.base.tracking.tracking_uri == tracking_uri_env()
    assert seen["register"].tracking_uri == tracking_uri_env()
    # on a cluster every path must be on the shared volume (the namespace's PVC at /data)
    for path in (train.data, train.storage, tune.base.data, tune.base.storage, tune.storage):
        assert path.startswith("/data/"), path


def test_generate_configmap_config_passes_the_generate_entry_point(configmap_configs, monkeypatch):
    jobs_generate = pytest.importorskip("jobs.generate")
    from pipelines import workflows
    from pipelines.batch.generate import GenerateConfig

    seen = {}

    def fake_pull(uri, tracking_uri, out):
        seen["pull"] = (uri, tracking_uri)
        return None, {"path": "/data/models/pulled", "name": "shapes-beta-vae", "version": 3}

    def fake_generation(config, tracking_uri=None):
        seen["generate"], seen["lineage_uri"] = config, tracking_uri
        return {}

    monkeypatch.setattr(workflows, "pull", fake_pull)
    monkeypatch.setattr(workflows, "generate_with_lineage", fake_generation)
    assert jobs_generate.main(["--config", str(configmap_configs["generate"])]) == 0
    config = seen["generate"]
    assert isinstance(config, GenerateConfig)
    assert seen["pull"] == (config.model_uri, tracking_uri_env())
    assert config.out.startswith("/data/") and "{date}" in config.out  # a new folder per scheduled day
    # a fresh seed per day (derived from the date), recorded as a lineage run in the same MLflow server
    assert config.seed is None and config.track and seen["lineage_uri"] == tracking_uri_env()
    assert config.evaluate_against.startswith("/data/")
    from pipelines.evaluation.config import EvaluateConfig

    EvaluateConfig.from_dict({**config.evaluation, "model": "m", "data": config.evaluate_against, "out": "o"})


CRON_FIELD = r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*"


def test_cronjob_schedules_the_generation_rayjob_daily():
    cronjob = find("CronJob", "vaepipe-generate-daily")
    fields = cronjob["spec"]["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(CRON_FIELD, f) for f in fields), cronjob["spec"]["schedule"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = find("ServiceAccount", pod["serviceAccountName"])["metadata"]["name"]
    binding = find("RoleBinding", "vaepipe-scheduler")
    assert binding["subjects"][0]["name"] == account
    rules = find("Role", binding["roleRef"]["name"])["rules"]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert pod["volumes"][0]["configMap"]["name"] == "vaepipe-generate-rayjob"
    # the template is rayjob-generate.yaml, byte for byte
    template_text = find("ConfigMap", "vaepipe-generate-rayjob")["data"]["rayjob.yaml"]
    assert template_text == (KUBERAY / "rayjob-generate.yaml").read_text(), (
        "the CronJob's RayJob template differs from rayjob-generate.yaml: copy the file into the ConfigMap")


def test_cronjob_script_creates_a_dated_rayjob_once_and_keeps_the_newest_seven(tmp_path):
    """create-rayjob.sh under /bin/sh with a recording stand-in for kubectl."""
    data = find("ConfigMap", "vaepipe-generate-rayjob")["data"]
    (tmp_path / "rayjob.yaml").write_text(data["rayjob.yaml"])
    (tmp_path / "create-rayjob.sh").write_text(data["create-rayjob.sh"])
    existing = tmp_path / "existing"
    existing.write_text("".join(f"rayjob.ray.io/vaepipe-generate-202601{d:02d}\n" for d in range(1, 10)))
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
case "$1 $2" in
  "get rayjob") grep -q "/$3$" {existing} ;;
  "get rayjobs") cat {existing} ;;
  "create -f") cat > {tmp_path}/created.yaml; echo "rayjob.ray.io/created" >> {existing} ;;
  "delete "*) : ;;
esac
""")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{kubectl.parent}:{os.environ['PATH']}", "TEMPLATE_DIR": str(tmp_path)}
    run = lambda: subprocess.run(["/bin/sh", str(tmp_path / "create-rayjob.sh")], env=env,
                                 capture_output=True, text=True, timeout=30)
    first = run()
    assert first.returncode == 0, first.stderr
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    day = subprocess.run(["date", "-u", "+%Y%m%d"], capture_output=True, text=True).stdout.strip()
    assert created["metadata"]["name"] == f"vaepipe-generate-{day}"
    template = yaml.safe_load(data["rayjob.yaml"])
    assert {**created, "metadata": {**created["metadata"], "name": "vaepipe-generate"}} == template
    calls = (tmp_path / "calls").read_text().splitlines()
    # 10 RayJobs now (9 + today's): the 3 oldest go
    assert calls[-1] == ("delete rayjob.ray.io/vaepipe-generate-20260101 rayjob.ray.io/vaepipe-generate-20260102 "
                         "rayjob.ray.io/vaepipe-generate-20260103")
    # a second start on the same day finds today's RayJob and creates nothing
    existing.write_text(f"rayjob.ray.io/vaepipe-generate-{day}\n")
    (tmp_path / "created.yaml").unlink()
    second = run()
    assert second.returncode == 0 and "already created" in second.stdout
    assert not (tmp_path / "created.yaml").exists()


def test_mlflow_compose_is_postgres_plus_s3_artifacts_plus_basic_auth():
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert any(re.fullmatch(r"--artifacts-destination=s3://\S+", arg) for arg in command)
    assert "--app-name=basic-auth" in command
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql") and "@postgres:" in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000" and "minio" in services
    assert set(mlflow["depends_on"]) == {"postgres", "create-bucket"}
    # secrets come from .env and are required there, never defaulted in the compose file
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[key]), key
    assert re.search(r"\$\{POSTGRES_PASSWORD:\?", services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    text = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    referenced = set(re.findall(r"\$\{(\w+)", text))
    example = (INFRA / "mlflow" / ".env.example").read_text()
    documented = set(re.findall(r"^(\w+)=", example, re.M))
    assert referenced <= documented, f".env.example misses {referenced - documented}"
    # basic_auth.ini: mounted where MLFLOW_AUTH_CONFIG_PATH points, and without an admin password
    mounts = dict(volume.split(":")[:2] for volume in mlflow["volumes"])
    assert mounts["./basic_auth.ini"] == env["MLFLOW_AUTH_CONFIG_PATH"]
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["admin_username"] and "admin_password" not in ini["mlflow"]
    assert "change" in (INFRA / "mlflow" / "basic_auth.ini").read_text().lower()
    server_image = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert all(dep in server_image for dep in ("mlflow[auth]", "psycopg2", "boto3"))


def test_mlflow_reads_the_basic_auth_ini(monkeypatch):
    # MLflow's own reader, loaded by file: importing mlflow.server.auth would build the server app
    # and needs Flask-WTF (mlflow[auth], in the server image only)
    import importlib.util

    path = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_basic_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(INFRA / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = module.read_auth_config()
    assert config.admin_username == "admin" and config.admin_password is None  # from the environment only
    assert config.database_uri.startswith("sqlite:////var/lib/mlflow-auth/")


def test_ray_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs first: schema + defaults for AWS
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == documented_image()
    types = config["available_node_types"]
    assert set(types) == {config["head_node_type"], "cpu_worker", "gpu_worker"}
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert re.match(r"(g|p)\d", types["gpu_worker"]["node_config"]["InstanceType"])


def test_local_stack_scripts_are_executable_bash():
    for name in ("start-stack.sh", "stop-stack.sh"):
        path = INFRA / "local" / name
        assert os.access(path, os.X_OK), f"{path} is not executable"
        checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in code if re.search(r'(\bray|\$\{?RAY\}?)"?\s+stop\b', line)], (
            "never `ray stop`: it stops every Ray instance of the user on the machine")
