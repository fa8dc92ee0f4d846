"""infra/config.py: cdk.json context -> one typed, validated EnvConfig per environment.

No synth here: infra.config is pure Python (the catalog and the standard library), so these run
without node. Everything that synthesizes is in tests/integration/test_infra.py, including
app.py failing on a bad key (it starts a process).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from cdk_support import configs, context_with

from infra.config import CONTEXT_KEY, ConfigError, parse_env, selected_envs
from pcelery.catalog import CATALOG


def test_cdk_json_gives_one_typed_config_per_environment():
    found = configs()
    assert set(found) == {"dev", "staging", "prod"}
    prod, dev = found["prod"], found["dev"]
    assert prod.database.multi_az and prod.protection.deletion_protection and prod.protection.termination_protection
    assert prod.database.rotation_days > 0 and prod.network.flow_logs and prod.network.interface_endpoints
    assert dev.cache is None and prod.cache is not None
    assert dev.workers.min_tasks == 0  # dev scales to zero
    assert all(len(c.availability_zones) >= 2 for c in found.values())


@pytest.mark.parametrize("path, value, expected", [
    ("database.instance_type", KeyError, "pcelery:environments.prod.database.instance_type: missing"),
    ("network.nat_gateways", "1", "pcelery:environments.prod.network.nat_gateways: '1' is a str, expected int"),
    ("account", "12345", "pcelery:environments.prod.account: '12345' is not valid"),
    ("workers.memory_mib", 3000, "pcelery:environments.prod.workers.memory_mib: 3000 is not valid with cpu 1024"),
    ("protection.removal_policy", "destroy", "pcelery:environments.prod.protection.removal_policy: 'destroy' in prod"),
    ("database.multiAz", True, "pcelery:environments.prod.database.multiAz: unknown key"),
    ("log_retention_days", 10, "pcelery:environments.prod.log_retention_days: 10 is not valid"),
    ("results_backend", KeyError, "pcelery:environments.prod.results_backend: missing or not an object"),
])
def test_bad_or_missing_value_names_the_key(path, value, expected):
    ctx = context_with("prod", path, value)
    with pytest.raises(ConfigError) as err:
        parse_env("prod", ctx[CONTEXT_KEY]["prod"])
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once():
    ctx = context_with("dev", "region", "Mars")
    ctx[CONTEXT_KEY]["dev"]["workers"]["min_tasks"] = 9
    ctx[CONTEXT_KEY]["dev"]["workers"]["max_tasks"] = 2
    with pytest.raises(ConfigError) as err:
        parse_env("dev", ctx[CONTEXT_KEY]["dev"])
    assert ".dev.region:" in str(err.value) and ".dev.workers.min_tasks:" in str(err.value)


@pytest.mark.parametrize("selection, expected", [
    (None, ["dev", "staging", "prod"]),
    ("prod", ["prod"]),
    ("dev, staging", ["dev", "staging"]),
])
def test_environment_selection(selection, expected):
    assert selected_envs(selection) == expected


def test_unknown_environment_selection_is_refused():
    with pytest.raises(ConfigError, match="unknown environment \\['qa'\\]"):
        selected_envs("dev,qa")


def test_worker_bounds_sit_inside_catalog_and_env_bounds():
    dev, prod = configs()["dev"], configs()["prod"]
    q = CATALOG.get("default")
    assert dev.worker_bounds(q) == (0, min(q.max_workers, dev.workers.max_tasks))
    assert prod.worker_bounds(q) == (1, min(q.max_workers, prod.workers.max_tasks))
    busy = replace(q, min_workers=5, max_workers=8)
    low, high = dev.worker_bounds(busy)
    assert low <= high == dev.workers.max_tasks
