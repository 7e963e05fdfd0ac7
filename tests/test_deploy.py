"""The deploy files parse, and what they run exists in the package."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from extractor.cli import build_parser
from extractor.config import parse_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
IMAGE = "ghcr.io/slm-lens/slm-lens:0.1.0"


def _subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


def _check_command(argv: list[str]) -> None:
    assert argv[0] == "slm-lens", argv
    assert argv[1] in _subcommands(), f"{argv[1]} is not an slm-lens command"
    # The arguments must parse as the real CLI would parse them.
    build_parser().parse_args(argv[1:])


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: p.name)
def test_yaml_parses(path):
    assert _docs(path)


def test_images_are_the_one_the_dockerfile_builds():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {IMAGE}" in dockerfile
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert "cuda" in base and base.startswith("pytorch/pytorch:")
    assert "slm-lens --help" in dockerfile
    found = set()
    for path in DEPLOY.rglob("*.yaml"):
        found |= set(re.findall(r"image: (\S+)", path.read_text()))
    assert found == {IMAGE}


def test_rayjob_entrypoint_is_a_real_command():
    (job,) = _docs(DEPLOY / "kuberay" / "rayjob.yaml")
    _check_command(shlex.split(job["spec"]["entrypoint"]))
    assert job["kind"] == "RayJob"


def test_cronjob_runs_watch_once():
    (cron,) = _docs(DEPLOY / "kuberay" / "watcher-cronjob.yaml")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    _check_command(container["command"])
    assert container["command"][1] == "watch" and "--once" in container["command"]


def test_raycluster_has_gpu_workers_and_a_cpu_head():
    (cluster,) = _docs(DEPLOY / "kuberay" / "raycluster.yaml")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_watchers_jobs_find_its_config_on_the_head():
    """The watcher passes its --config path on to every job, whose entrypoint runs on the
    head: the CronJob's ConfigMap path must be mounted there too (it was not: a review)."""
    (cron,) = _docs(DEPLOY / "kuberay" / "watcher-cronjob.yaml")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    config = command[command.index("--config") + 1]
    (cluster,) = _docs(DEPLOY / "kuberay" / "raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]

    def mounted_config_maps(spec):
        maps = {v["name"]: v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
        return {
            m["mountPath"]: maps[m["name"]]
            for c in spec["containers"]
            for m in c.get("volumeMounts", [])
            if m["name"] in maps
        }

    folder = config.rsplit("/", 1)[0]
    assert mounted_config_maps(head)[folder] == mounted_config_maps(pod)[folder]


def test_the_autoscaler_sidecar_has_the_ray_token():
    """KubeRay builds the autoscaler container with its own env: without the token it
    cannot reach an authenticated GCS, and the GPU group never scales (a review)."""
    (cluster,) = _docs(DEPLOY / "kuberay" / "raycluster.yaml")
    assert cluster["spec"]["enableInTreeAutoscaling"]
    env = {e["name"]: e for e in cluster["spec"]["autoscalerOptions"]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_the_image_can_run_the_aws_launchers_head():
    """deploy/cluster.yaml runs its head in this image, whose autoscaler starts the GPU
    workers: the AWS node provider needs boto3, and worker setup ssh and rsync."""
    (launcher,) = _docs(DEPLOY / "cluster.yaml")
    assert launcher["docker"]["image"] == IMAGE and launcher["provider"]["type"] == "aws"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    installs = " ".join(
        line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")
    )
    for needed in ("boto3", "openssh-client", "rsync"):
        assert needed in installs, needed


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_gpu_workers_tolerate_gpu_taints_and_have_shared_memory(name):
    """Both KubeRay manifests schedule their GPU workers alike (rayjob.yaml lacked both:
    a review)."""
    (doc,) = _docs(DEPLOY / "kuberay" / f"{name}.yaml")
    spec = doc["spec"]["rayClusterSpec"] if name == "rayjob" else doc["spec"]
    pod = spec["workerGroupSpecs"][0]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_cluster_launcher_config():
    (launcher,) = _docs(DEPLOY / "cluster.yaml")
    types = launcher["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["gpu_worker"]["min_workers"] <= types["gpu_worker"]["max_workers"]


def test_readme_commands_parse_with_their_flags():
    """Every `slm-lens` command in the README's code blocks, continued lines joined, parses
    as the real CLI parses it: flags too, not only the command's name."""
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = [m for line in lines for m in re.findall(r"(?:^|-- )(slm-lens .+)", line)]
    assert len(commands) >= 4
    for command in commands:
        _check_command(shlex.split(command.split(" #")[0]))


def test_example_run_config_validates():
    raw = yaml.safe_load((DEPLOY / "run.example.yaml").read_text())
    cfg = parse_config(raw)
    assert cfg.workers.gpus == 1 and cfg.store.startswith("s3://")


#: Per family: layout, speech marker, speech tokenizer kind, HuBERT layer, units in the vocab.
FAMILIES = {
    "sims.yaml": ("sims", False, "hubert-kmeans", 11, 500),
    "slam.yaml": ("slam", False, "hubert-kmeans", 11, 500),
    "spirit-lm.yaml": ("spirit-lm", True, "spirit-linear", 11, 501),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_has_a_validated_example(name):
    from extractor.speech.layouts import layout_from_config

    raw = yaml.safe_load((DEPLOY / "models" / name).read_text())
    cfg = parse_config(raw)
    layout, marker, kind, layer, units = FAMILIES[name]
    assert (cfg.model.layout, cfg.prompt.speech_marker, cfg.speech.kind) == (layout, marker, kind)
    assert cfg.speech.layer == layer and layout_from_config(layout).n_units == units
    # Without the switch, the family's own default applies (and is what runs.config records).
    del raw["prompt"]["speech_marker"]
    assert parse_config(raw).prompt.speech_marker is marker
    assert parse_config(raw).to_dict()["prompt"]["speech_marker"] is marker


def _containers(doc):
    """Every container spec anywhere in a manifest."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "containers":
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _containers(item)


def test_kuberay_manifests_authenticate_and_hold_no_credentials():
    import yaml

    from extractor.service.environment import SECRETS

    folder = Path(__file__).resolve().parents[1] / "deploy" / "kuberay"
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert docs["rayjob"]["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    for name in ("raycluster", "watcher-cronjob"):
        containers = list(_containers(docs[name]))
        assert containers
        for c in containers:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", (name, c["name"])
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    for name, doc in docs.items():
        for c in _containers(doc):
            for e in c.get("env", []):
                assert e["name"] not in SECRETS or "value" not in e, (name, e["name"])
