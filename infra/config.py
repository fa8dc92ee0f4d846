"""Per-environment settings of the CDK app, parsed from cdk.json context into one typed object.

cdk.json holds one block per environment under the context key ``pcelery:environments``. Every
value is checked here, before a single construct exists, and every problem is reported at once
with the full key path (``pcelery:environments.prod.database.instance_type``), so a bad edit
fails ``cdk synth`` with a message that says which key to fix. Constructs never read context or
env vars; they get these values as keyword arguments from the stacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pcelery.catalog import ENVIRONMENTS, QueueContract

CONTEXT_KEY = "pcelery:environments"
# `-c env=prod` (or `-c env=dev,staging`) picks environments; without it every one is synthesized.
SELECT_KEY = "env"
DEPLOYABLE = tuple(e for e in ENVIRONMENTS if e != "local")

# Memory of the RDS classes we expect to use, to derive Postgres's default max_connections
# (LEAST(DBInstanceClassMemory/9531392, 5000)) for the connections alarm. A class missing here
# is a config error rather than a silently wrong threshold.
DB_CLASS_MEMORY_GIB = {
    "t4g.micro": 1, "t4g.small": 2, "t4g.medium": 4, "t4g.large": 8, "t4g.xlarge": 16,
    "m7g.large": 8, "m7g.xlarge": 16, "m7g.2xlarge": 32,
    "m6g.large": 8, "m6g.xlarge": 16, "m6g.2xlarge": 32,
    "r7g.large": 16, "r7g.xlarge": 32, "r7g.2xlarge": 64,
    "r6g.large": 16, "r6g.xlarge": 32, "r6g.2xlarge": 64,
}
# Fargate's valid (cpu, memory) pairs for the sizes a Celery worker plausibly needs.
FARGATE_MEMORY = {
    256: (512, 1024, 2048),
    512: tuple(range(1024, 4097, 1024)),
    1024: tuple(range(2048, 8193, 1024)),
    2048: tuple(range(4096, 16385, 1024)),
    4096: tuple(range(8192, 30721, 1024)),
}
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 3653)  # CloudWatch's
REMOVAL_POLICIES = ("destroy", "snapshot", "retain")

_ACCOUNT_RE = re.compile(r"^\d{12}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_CIDR_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CACHE_NODE_RE = re.compile(r"^cache\.[a-z0-9]+\.[a-z0-9]+$")


class ConfigError(ValueError):
    """cdk.json context that cannot be deployed. The message names every bad key and the fix."""


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    cidr: str
    nat_gateways: int
    flow_logs: bool
    # Interface endpoints cost about $7.3 per endpoint and AZ a month; they pay off only where
    # the NAT data charge ($0.045/GB) of SQS/ECR/logs traffic is larger than that.
    interface_endpoints: bool


@dataclass(frozen=True, kw_only=True)
class DatabaseConfig:
    instance_type: str
    allocated_storage_gib: int
    max_allocated_storage_gib: int
    multi_az: bool
    backup_retention_days: int
    rotation_days: int  # 0: no rotation

    @property
    def max_connections(self) -> int:
        return min(DB_CLASS_MEMORY_GIB[self.instance_type] * 1024**3 // 9531392, 5000)


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """ElastiCache Redis as the optional Celery result backend."""

    enabled: bool
    node_type: str
    replicas: int


@dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    cpu: int
    memory_mib: int
    # Bounds the environment puts around each queue's catalog bounds: the service for queue q
    # runs between max(q.min_workers, min_tasks) and min(q.max_workers, max_tasks) tasks.
    min_tasks: int
    max_tasks: int


@dataclass(frozen=True, kw_only=True)
class ProtectionConfig:
    removal_policy: str  # what happens to RDS, queues and logs when the stack goes away
    deletion_protection: bool  # RDS DeletionProtection
    termination_protection: bool  # CloudFormation termination protection of the stateful stack


@dataclass(frozen=True, kw_only=True)
class EnvConfig:
    name: str
    account: str
    region: str
    availability_zones: tuple[str, ...]
    network: NetworkConfig
    database: DatabaseConfig
    results_backend: CacheConfig
    workers: WorkersConfig
    protection: ProtectionConfig
    alarm_email: str | None
    log_retention_days: int
    outbox_lag_alarm_seconds: int

    def worker_bounds(self, q: QueueContract) -> tuple[int, int]:
        """(min, max) tasks of the worker service of queue q in this environment."""
        high = min(q.max_workers, self.workers.max_tasks)
        low = min(max(q.min_workers, self.workers.min_tasks), high)
        return low, high

    @property
    def cache(self) -> CacheConfig | None:
        return self.results_backend if self.results_backend.enabled else None


class _Reader:
    """Reads one environment's block and collects every problem with its full key path."""

    def __init__(self, raw: dict, path: str, problems: list[str]):
        self.raw, self.path, self.problems = raw, path, problems

    def _bad(self, key: str, msg: str):
        self.problems.append(f"{self.path}.{key}: {msg}")

    def section(self, key: str) -> _Reader:
        value = self.raw.get(key)
        if not isinstance(value, dict):
            self._bad(key, "missing or not an object: add the section (see infra/README.md)")
            value = {}
        return _Reader(value, f"{self.path}.{key}", self.problems)

    def get(self, key: str, kind: type, *, optional: bool = False, check=None, hint: str = "") -> Any:
        if key not in self.raw or self.raw[key] is None:
            if not optional:
                self._bad(key, f"missing: set it ({kind.__name__}{', ' + hint if hint else ''})")
            return None
        value = self.raw[key]
        # bool is an int in Python; a 'true' where a count belongs is a mistake worth naming.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self._bad(key, f"{value!r} is a {type(value).__name__}, expected {kind.__name__}"
                           f"{': ' + hint if hint else ''}")
            return None
        if check is not None and not check(value):
            self._bad(key, f"{value!r} is not valid: {hint}")
            return None
        return value

    def unknown_keys(self, known: set[str]):
        for key in sorted(set(self.raw) - known):
            self._bad(key, f"unknown key (known: {', '.join(sorted(known))}): remove or rename it")


def parse_env(name: str, raw: Any) -> EnvConfig:
    """The validated config of one environment from its cdk.json context block."""
    path = f"{CONTEXT_KEY}.{name}"
    if name not in DEPLOYABLE:
        raise ConfigError(f"{path}: unknown environment, use one of {', '.join(DEPLOYABLE)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: missing or not an object: add the environment's block to cdk.json")
    problems: list[str] = []
    r = _Reader(raw, path, problems)
    r.unknown_keys({"account", "region", "availability_zones", "network", "database",
                    "results_backend", "workers", "protection", "alarm_email",
                    "log_retention_days", "outbox_lag_alarm_seconds"})

    account = r.get("account", str, check=_ACCOUNT_RE.match, hint="a 12-digit AWS account id as a string")
    region = r.get("region", str, check=_REGION_RE.match, hint="an AWS region such as eu-west-1")
    azs = r.get("availability_zones", list,
                hint="two or more AZ names of the region, e.g. [\"eu-west-1a\", \"eu-west-1b\"]")
    if azs is not None:
        if len(azs) < 2 or len(set(azs)) != len(azs) or not all(isinstance(a, str) for a in azs):
            r._bad("availability_zones", f"{azs!r}: give two or more distinct AZ names (RDS needs two)")
        elif region and not all(a.startswith(region) and len(a) == len(region) + 1 for a in azs):
            r._bad("availability_zones", f"{azs!r} are not all zones of {region}: use names like {region}a")

    n = r.section("network")
    n.unknown_keys({"cidr", "nat_gateways", "flow_logs", "interface_endpoints"})
    network = {
        "cidr": n.get("cidr", str, check=_valid_cidr, hint="an IPv4 CIDR between /16 and /24, e.g. 10.20.0.0/16"),
        "nat_gateways": n.get("nat_gateways", int, check=lambda v: 1 <= v <= 3,
                           hint="1 to 3 (Fargate tasks reach SQS, ECR and logs through NAT)"),
        "flow_logs": n.get("flow_logs", bool),
        "interface_endpoints": n.get("interface_endpoints", bool),
    }
    if azs and network["nat_gateways"] and network["nat_gateways"] > len(azs):
        n._bad("nat_gateways", f"{network['nat_gateways']} is more than the {len(azs)} AZs: use at most one per AZ")

    d = r.section("database")
    d.unknown_keys({"instance_type", "allocated_storage_gib", "max_allocated_storage_gib", "multi_az",
                    "backup_retention_days", "rotation_days"})
    database = {
        "instance_type": d.get("instance_type", str, check=lambda v: v in DB_CLASS_MEMORY_GIB,
                            hint=f"one of {', '.join(DB_CLASS_MEMORY_GIB)} (without the db. prefix)"),
        "allocated_storage_gib": d.get("allocated_storage_gib", int, check=lambda v: 20 <= v <= 65536,
                                    hint="20 to 65536 GiB"),
        "max_allocated_storage_gib": d.get("max_allocated_storage_gib", int, check=lambda v: 20 <= v <= 65536,
                                        hint="20 to 65536 GiB, at least allocated_storage_gib"),
        "multi_az": d.get("multi_az", bool),
        "backup_retention_days": d.get("backup_retention_days", int, check=lambda v: 1 <= v <= 35,
                                    hint="1 to 35 days (0 would turn backups off)"),
        "rotation_days": d.get("rotation_days", int, check=lambda v: v == 0 or 1 <= v <= 365,
                            hint="0 (no rotation) or 1 to 365 days"),
    }
    if (database["allocated_storage_gib"] and database["max_allocated_storage_gib"]
            and database["max_allocated_storage_gib"] < database["allocated_storage_gib"]):
        d._bad("max_allocated_storage_gib", "is below allocated_storage_gib: raise it")

    c = r.section("results_backend")
    c.unknown_keys({"enabled", "node_type", "replicas"})
    cache = {
        "enabled": c.get("enabled", bool),
        "node_type": c.get("node_type", str, check=_CACHE_NODE_RE.match,
                           hint="an ElastiCache node type such as cache.t4g.micro"),
        "replicas": c.get("replicas", int, check=lambda v: 0 <= v <= 5, hint="0 to 5 read replicas"),
    }

    w = r.section("workers")
    w.unknown_keys({"cpu", "memory_mib", "min_tasks", "max_tasks"})
    workers = {
        "cpu": w.get("cpu", int, check=lambda v: v in FARGATE_MEMORY,
                     hint=f"Fargate CPU units, one of {list(FARGATE_MEMORY)}"),
        "memory_mib": w.get("memory_mib", int),
        "min_tasks": w.get("min_tasks", int, check=lambda v: 0 <= v <= 100,
                           hint="0 to 100 (0 lets idle workers scale to zero)"),
        "max_tasks": w.get("max_tasks", int, check=lambda v: 1 <= v <= 100, hint="1 to 100"),
    }
    if workers["cpu"] in FARGATE_MEMORY and workers["memory_mib"] is not None \
            and workers["memory_mib"] not in FARGATE_MEMORY[workers["cpu"]]:
        w._bad("memory_mib", f"{workers['memory_mib']} is not valid with cpu {workers['cpu']} on Fargate: "
                             f"use one of {list(FARGATE_MEMORY[workers['cpu']])}")
    if workers["min_tasks"] is not None and workers["max_tasks"] is not None \
            and workers["min_tasks"] > workers["max_tasks"]:
        w._bad("min_tasks", f"{workers['min_tasks']} exceeds max_tasks {workers['max_tasks']}: lower it")

    p = r.section("protection")
    p.unknown_keys({"removal_policy", "deletion_protection", "termination_protection"})
    protection = {
        "removal_policy": p.get("removal_policy", str, check=lambda v: v in REMOVAL_POLICIES,
                             hint=f"one of {', '.join(REMOVAL_POLICIES)}"),
        "deletion_protection": p.get("deletion_protection", bool),
        "termination_protection": p.get("termination_protection", bool),
    }
    if name == "prod" and protection["removal_policy"] == "destroy":
        p._bad("removal_policy", "'destroy' in prod would delete the database with the stack: use snapshot or retain")

    email = r.get("alarm_email", str, optional=True, check=_EMAIL_RE.match, hint="an e-mail address, or null for none")
    retention = r.get("log_retention_days", int, check=lambda v: v in LOG_RETENTION_DAYS,
                      hint=f"one of CloudWatch's values {list(LOG_RETENTION_DAYS)}")
    lag = r.get("outbox_lag_alarm_seconds", int, check=lambda v: 60 <= v <= 86400,
                hint="60 to 86400 seconds of pending-row age before the outbox-lag alarm fires")

    if problems:
        raise ConfigError("invalid cdk.json context:\n  " + "\n  ".join(problems))
    return EnvConfig(
        name=name,
        account=account,
        region=region,
        availability_zones=tuple(azs),
        network=NetworkConfig(**network),
        database=DatabaseConfig(**database),
        results_backend=CacheConfig(**cache),
        workers=WorkersConfig(**workers),
        protection=ProtectionConfig(**protection),
        alarm_email=email,
        log_retention_days=retention,
        outbox_lag_alarm_seconds=lag,
    )


def _valid_cidr(value: str) -> bool:
    m = _CIDR_RE.match(value)
    return bool(m) and all(int(o) <= 255 for o in m.groups()[:4]) and 16 <= int(m.group(5)) <= 24


def selected_envs(selection: Any) -> list[str]:
    """The environments named by `-c env=...` (comma-separated), or all of them."""
    if selection in (None, "", "all"):
        return list(DEPLOYABLE)
    if not isinstance(selection, str):
        raise ConfigError(f"context {SELECT_KEY}={selection!r}: give names like -c env=prod or -c env=dev,staging")
    names = [s.strip() for s in selection.split(",") if s.strip()]
    unknown = [s for s in names if s not in DEPLOYABLE]
    if unknown or not names:
        raise ConfigError(
            f"context {SELECT_KEY}={selection!r}: unknown environment {unknown}; use one or more of "
            f"{', '.join(DEPLOYABLE)} (comma-separated), or leave it out for all"
        )
    return names


def load_configs(context_lookup) -> list[EnvConfig]:
    """Configs of the selected environments. `context_lookup(key)` is `app.node.try_get_context`."""
    block = context_lookup(CONTEXT_KEY)
    if not isinstance(block, dict):
        raise ConfigError(
            f"context {CONTEXT_KEY} is missing: run the app through the CDK CLI from the repo root "
            "(`npx cdk synth`), which passes cdk.json's context; in code, pass it to cdk.App(context=...)"
        )
    configs, errors = [], []
    for name in selected_envs(context_lookup(SELECT_KEY)):
        try:
            configs.append(parse_env(name, block.get(name)))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    return configs
