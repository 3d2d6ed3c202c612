"""The cluster configs under cluster/configs/ (issue 3, item 4; docs/design.md §2).

The AWS launcher YAML is checked the way `ray up` checks it: Ray's own `prepare_config` +
`validate_config` (its JSON schema). The KubeRay manifest has no schema available offline, so its
autoscaling, resource and exposure fields are checked one by one, and its entrypoint is parsed
by cytosynth's own CLI. Both must use the Ray version this project is tested with.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cytosynth.jobs.cli import build_parser

CONFIGS = Path(__file__).resolve().parents[1] / "cluster" / "configs"


@pytest.fixture
def aws() -> dict:
    return yaml.safe_load((CONFIGS / "aws.yaml").read_text())


@pytest.fixture
def rayjob() -> dict:
    docs = list(yaml.safe_load_all((CONFIGS / "kuberay.yaml").read_text()))
    [job] = [d for d in docs if d["kind"] == "RayJob"]
    return job


def test_aws_launcher_config_passes_rays_own_validation(aws):
    validate_config(prepare_config(aws))


def test_rays_validation_rejects_a_misspelled_field(aws):
    aws["available_node_types"]["gpu"]["min_worker"] = 0  # the schema allows no unknown fields
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(aws))


def test_aws_head_is_cpu_only_and_gpu_workers_scale_from_zero(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    [gpu] = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu["min_workers"] == 0
    assert 1 <= gpu["max_workers"] <= aws["max_workers"]
    assert aws["idle_timeout_minutes"] > 0  # idle GPU nodes are released


def test_aws_nodes_reach_s3_through_instance_profiles_not_keys(aws):
    for node_type in aws["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = (CONFIGS / "aws.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text


def test_aws_dashboard_is_not_public(aws):
    [start] = [c for c in aws["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start


def test_aws_nodes_install_the_project_and_the_tested_ray(aws):
    commands = " ".join(aws["setup_commands"])
    assert f"ray[default]=={ray.__version__}" in commands
    assert "pip install -e ~/cytosynth" in commands
    assert aws["file_mounts"]["~/cytosynth"] == "."


def test_kuberay_gpu_group_autoscales_from_zero(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    [gpu] = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    [container] = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"] == "1"


def test_kuberay_head_runs_no_replicas_and_is_not_exposed(rayjob):
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    [container] = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_kuberay_pods_use_the_s3_service_account_not_secrets():
    docs = list(yaml.safe_load_all((CONFIGS / "kuberay.yaml").read_text()))
    [account] = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    [job] = [d for d in docs if d["kind"] == "RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert all(g["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"] for g in groups)
    assert "secretKeyRef" not in (CONFIGS / "kuberay.yaml").read_text()


def test_kuberay_uses_the_tested_ray_and_the_project_image(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py\d+-gpu$", dockerfile, re.M)


def test_kuberay_entrypoint_is_a_valid_generate_command(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["cytosynth", "generate"]
    args = build_parser().parse_args(argv[1:])
    assert args.ray_address == "auto"
    assert args.out.startswith("s3://") and args.model_dir.startswith("s3://")
    assert args.gpus_per_replica == 1
