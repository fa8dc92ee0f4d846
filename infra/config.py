"""Per-environment settings of the CDK app, parsed from cdk.json context into one typed object.

cdk.json holds one block per environment under the context key ``pcelery:environments``. Every
value is checked here, before a single construct exists, and every problem is reported at once
with the full key path (``pcelery:environments.prod.database.instance_type``), so a bad edit
fails ``cdk synth`` with a message that says which key to fix. Constructs never read context or
env vars; they get these values as keyword arguments from the stacks.

The ``application`` block names what the team deploys: its image, its task modules, its queue
catalog, its periodic schedules and its own secrets. The catalog is imported here, at synth, so the
queues, workers, alarms and grants of an environment come from the very spec its containers get as
PCELERY_CATALOG; the schedules too (``application.schedules``, PCELERY_SCHEDULES of the scheduler
service), so a schedule that cannot load fails synth rather than every scheduler start.
``database`` is either the RDS instance the stack creates or, with ``external``, the team's
existing Postgres. Still no aws_cdk import: the unit tests import this module without node.
(pcelery.scheduler, imported only where an environment names schedules, is pure Python too.)
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pcelery.catalog import ENVIRONMENTS, Catalog, CatalogError, QueueContract, load_catalog

if TYPE_CHECKING:
    from pcelery.scheduler import Schedule

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
# Scheduler tasks (`scheduler.tasks`) where cdk.json does not say: two, so one can stop (a deploy,
# a Fargate host retired) without a slot going late. Several never submit a slot twice.
DEFAULT_SCHEDULER_TASKS = 2
MAX_SCHEDULER_TASKS = 4

_ACCOUNT_RE = re.compile(r"^\d{12}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_CIDR_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CACHE_NODE_RE = re.compile(r"^cache\.[a-z0-9]+\.[a-z0-9]+$")

# --- application ---
DEFAULT_CATALOG = "pcelery.catalog:CATALOG"
# The dev harness lives in the repository only (devstack/): no image has it, so a module of it in
# a deployed environment would fail every worker start (or dead-letter every message).
HARNESS_PACKAGE = "devstack"
# Variables the CDK app sets itself. DATABASE_URL would replace DB_HOST and the DB_* secrets
# (pcelery.settings reads it first), so it is the app's too.
RESERVED_ENV_PREFIXES = ("PCELERY_", "DB_", "REDIS_", "AWS_")
RESERVED_ENV_NAMES = ("DATABASE_URL",)
# `environment` lands in the task definition in plain text: a name like these is a credential.
_CREDENTIAL_NAME_RE = re.compile(r"PASSWORD|TOKEN|SECRET|KEY")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[a-f0-9]{64}"
# <account>.dkr.ecr.<region>.amazonaws.com[.cn]/<repository>[:<tag>][@<digest>]
_ECR_URI_RE = re.compile(
    rf"^(?P<account>\d{{12}})\.dkr\.ecr\.(?P<region>[a-z]{{2}}(?:-gov)?-[a-z]+-\d)\.amazonaws\.com(?P<cn>\.cn)?"
    rf"/(?P<repository>{_REPOSITORY})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
# Any other registry: [<host>[:<port>]/]<repository>[:<tag>][@<digest>]; a first component is
# a host when it has a dot or a port, or is localhost (Docker's rule).
_IMAGE_URI_RE = re.compile(
    r"^(?:(?P<registry>(?:[a-z0-9-]+\.)+[a-z0-9-]+(?::\d+)?|[a-z0-9-]+:\d+|localhost)/)?"
    rf"(?P<repository>{_REPOSITORY})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)

# --- secrets and an external database ---
_PARTITION = r"aws|aws-cn|aws-us-gov"
_ARN_REGION = r"[a-z]{2}(?:-gov)?-[a-z]+-\d"
# A complete Secrets Manager ARN: the name, then the "-" and six characters Secrets Manager
# appends. Without them the ARN is partial, and a grant on it would have to be a wildcard.
_SECRET_ARN_RE = re.compile(
    rf"^arn:(?P<partition>{_PARTITION}):secretsmanager:(?P<region>{_ARN_REGION}):(?P<account>\d{{12}}):"
    r"secret:(?P<name>[A-Za-z0-9/_+=.@-]+)-[A-Za-z0-9]{6}$"
)
# A KMS key by its key ARN (an alias ARN cannot be the resource of a kms:Decrypt grant).
_KMS_KEY_ARN_RE = re.compile(
    rf"^arn:(?P<partition>{_PARTITION}):kms:(?P<region>{_ARN_REGION}):(?P<account>\d{{12}}):"
    r"key/(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$"
)
_SECURITY_GROUP_RE = re.compile(r"^sg-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
_IPV4_RE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
# An unquoted Postgres identifier (at most 63 bytes): also safe in the path of the store's URL.
_PG_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
# What the stack's own RDS instance is made of; none of it applies to an external database.
_RDS_KEYS = ("instance_type", "allocated_storage_gib", "max_allocated_storage_gib", "multi_az",
             "backup_retention_days", "rotation_days")
_EXTERNAL_KEYS = {"host", "port", "name", "secret_arn", "kms_key_arn", "security_group_id"}
_SECRET_KEYS = {"arn", "field", "kms_key_arn"}


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
class ExternalDatabaseConfig:
    """The team's existing Postgres (`database.external`), used instead of an RDS instance of the
    stack's own: the claim-check table then lives next to the team's data, so a task row commits
    in the same transaction as the rows that caused it. The stack creates nothing of it."""

    host: str
    port: int
    name: str
    secret_arn: str  # complete ARN of an RDS-format secret: JSON keys "username" and "password"
    kms_key_arn: str | None  # the customer key that encrypts the secret, if not aws/secretsmanager
    security_group_id: str | None  # the database's group: the stack adds its tasks' ingress rules


@dataclass(frozen=True, kw_only=True)
class SecretReference:
    """A Secrets Manager secret (or one JSON key of it) that ECS injects into a container."""

    arn: str  # complete ARN, with the six-character suffix
    field: str | None = None  # JSON key of the secret's value; None: the whole value
    kms_key_arn: str | None = None  # the customer key that encrypts it, if not aws/secretsmanager


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
class SchedulerConfig:
    """The scheduler service (pcelery-scheduler), where `application.schedules` names schedules."""

    # Tasks that run side by side: each slot is still submitted once (its task id derives from
    # the schedule and the slot), so more only adds availability.
    tasks: int = DEFAULT_SCHEDULER_TASKS


@dataclass(frozen=True, kw_only=True)
class ProtectionConfig:
    removal_policy: str  # what happens to RDS, queues and logs when the stack goes away
    deletion_protection: bool  # RDS DeletionProtection
    termination_protection: bool  # CloudFormation termination protection of the stateful stack


@dataclass(frozen=True, kw_only=True)
class EcrImage:
    """The parts of an ECR image URI that CDK needs to grant the pull on the repository."""

    account: str
    region: str
    partition: str  # aws, or aws-cn for *.amazonaws.com.cn
    repository: str
    tag_or_digest: str  # "1.4.2" or "sha256:..." (the digest wins when the URI has both)

    @property
    def repository_arn(self) -> str:
        return f"arn:{self.partition}:ecr:{self.region}:{self.account}:repository/{self.repository}"


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """The team's image: built from `directory` at deploy time, or the existing image `uri`."""

    directory: Path | None = None  # absolute: resolved against the directory of cdk.json
    file: str | None = None  # the Dockerfile, relative to `directory` (None: its Dockerfile)
    build_args: Mapping[str, str] = field(default_factory=dict)
    uri: str | None = None
    ecr: EcrImage | None = None  # set when `uri` is an ECR image


@dataclass(frozen=True, kw_only=True)
class ApplicationConfig:
    """What the team deploys: its image and code, and the queue catalog its code declares."""

    image: ImageConfig
    task_modules: tuple[str, ...]  # the workers' PCELERY_TASK_MODULES
    catalog_spec: str  # "module:ATTRIBUTE", every container's PCELERY_CATALOG
    catalog: Catalog  # catalog_spec, loaded at synth: the queues, workers, alarms and grants
    celery_app: str | None  # the workers' PCELERY_CELERY_APP; None: the product's own app
    # "module:ATTRIBUTE" of the team's schedules, the scheduler's PCELERY_SCHEDULES; None: no scheduler.
    schedules_spec: str | None
    schedules: tuple[Schedule, ...]  # schedules_spec, loaded at synth (checked, then only named)
    python_path: tuple[Path, ...]  # absolute; where synth imports the catalog and schedules from
    environment: Mapping[str, str]  # extra non-secret variables of every container
    secrets: Mapping[str, SecretReference]  # the team's secrets, ECS secrets of every container


@dataclass(frozen=True, kw_only=True)
class EnvConfig:
    name: str
    account: str
    region: str
    availability_zones: tuple[str, ...]
    network: NetworkConfig
    # The stack's own RDS instance, or the team's existing database (database.external).
    database: DatabaseConfig | ExternalDatabaseConfig
    results_backend: CacheConfig
    workers: WorkersConfig
    scheduler: SchedulerConfig  # used only where application.schedules is set
    protection: ProtectionConfig
    alarm_email: str | None
    log_retention_days: int
    outbox_lag_alarm_seconds: int
    application: ApplicationConfig

    @property
    def catalog(self) -> Catalog:
        """The environment's queue catalog (application.catalog, loaded at synth)."""
        return self.application.catalog

    def worker_bounds(self, q: QueueContract) -> tuple[int, int]:
        """(min, max) tasks of the worker service of queue q in this environment."""
        high = min(q.max_workers, self.workers.max_tasks)
        low = min(max(q.min_workers, self.workers.min_tasks), high)
        return low, high

    @property
    def cache(self) -> CacheConfig | None:
        return self.results_backend if self.results_backend.enabled else None

    @property
    def rds(self) -> DatabaseConfig | None:
        """The RDS instance the stateful stack creates; None with an external database."""
        return self.database if isinstance(self.database, DatabaseConfig) else None

    @property
    def external_database(self) -> ExternalDatabaseConfig | None:
        return self.database if isinstance(self.database, ExternalDatabaseConfig) else None


class _Reader:
    """Reads one environment's block and collects every problem with its full key path."""

    def __init__(self, raw: dict, path: str, problems: list[str]):
        self.raw, self.path, self.problems = raw, path, problems

    def _bad(self, key: str, msg: str):
        self.problems.append(f"{self.path}.{key}: {msg}")

    def _bad_here(self, msg: str):
        self.problems.append(f"{self.path}: {msg}")

    def section(self, key: str, *, hint: str = "add the section (see infra/README.md)") -> _Reader:
        value = self.raw.get(key)
        if not isinstance(value, dict):
            self._bad(key, f"missing or not an object: {hint}")
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


def parse_env(name: str, raw: Any, *, base_dir: Path) -> EnvConfig:
    """The validated config of one environment from its cdk.json context block.

    `base_dir` is the directory of cdk.json: the application's paths are relative to it.
    """
    path = f"{CONTEXT_KEY}.{name}"
    if name not in DEPLOYABLE:
        raise ConfigError(f"{path}: unknown environment, use one of {', '.join(DEPLOYABLE)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: missing or not an object: add the environment's block to cdk.json")
    problems: list[str] = []
    r = _Reader(raw, path, problems)
    r.unknown_keys({"account", "region", "availability_zones", "network", "database",
                    "results_backend", "workers", "scheduler", "protection", "alarm_email",
                    "log_retention_days", "outbox_lag_alarm_seconds", "application"})

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

    database = _database(r, account=account, region=region)

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

    scheduler = _scheduler(r)

    p = r.section("protection")
    p.unknown_keys({"removal_policy", "deletion_protection", "termination_protection"})
    protection = {
        "removal_policy": p.get("removal_policy", str, check=lambda v: v in REMOVAL_POLICIES,
                             hint=f"one of {', '.join(REMOVAL_POLICIES)}"),
        "deletion_protection": p.get("deletion_protection", bool),
        "termination_protection": p.get("termination_protection", bool),
    }
    if name == "prod" and protection["removal_policy"] == "destroy":
        lost = ("the queues, with the messages in them," if isinstance(database, ExternalDatabaseConfig)
                else "the database")
        p._bad("removal_policy", f"'destroy' in prod would delete {lost} with the stack: use snapshot or retain")

    email = r.get("alarm_email", str, optional=True, check=_EMAIL_RE.match, hint="an e-mail address, or null for none")
    retention = r.get("log_retention_days", int, check=lambda v: v in LOG_RETENTION_DAYS,
                      hint=f"one of CloudWatch's values {list(LOG_RETENTION_DAYS)}")
    lag = r.get("outbox_lag_alarm_seconds", int, check=lambda v: 60 <= v <= 86400,
                hint="60 to 86400 seconds of pending-row age before the outbox-lag alarm fires")
    application = _application(r, base_dir=base_dir, account=account, region=region)

    if problems:
        raise ConfigError("invalid cdk.json context:\n  " + "\n  ".join(problems))
    return EnvConfig(
        name=name,
        account=account,
        region=region,
        availability_zones=tuple(azs),
        network=NetworkConfig(**network),
        database=database,
        results_backend=CacheConfig(**cache),
        workers=WorkersConfig(**workers),
        scheduler=scheduler,
        protection=ProtectionConfig(**protection),
        alarm_email=email,
        log_retention_days=retention,
        outbox_lag_alarm_seconds=lag,
        application=application,
    )


def _scheduler(env: _Reader) -> SchedulerConfig | None:
    """`scheduler` (optional): how many pcelery-scheduler tasks run where application.schedules is set."""
    hint = '{"tasks": 2}: how many scheduler tasks run side by side; leave it out for 2'
    if env.raw.get("scheduler") is None:
        return SchedulerConfig()
    if not isinstance(env.raw["scheduler"], dict):
        env.section("scheduler", hint=f"give {hint}")
        return None
    s = env.section("scheduler")
    s.unknown_keys({"tasks"})
    tasks = s.get("tasks", int, check=lambda v: 1 <= v <= MAX_SCHEDULER_TASKS,
                  hint=f"1 to {MAX_SCHEDULER_TASKS} scheduler tasks (each slot is submitted once however many run; "
                       "2 keep the schedules on time while one is replaced)")
    application = env.raw.get("application")
    if isinstance(application, dict) and application.get("schedules") is None:
        env._bad("scheduler", "is set, but application.schedules is not, so no scheduler runs: remove the block, or "
                              'name your schedules in application.schedules (e.g. "shop.schedules:SCHEDULES")')
    return None if tasks is None else SchedulerConfig(tasks=tasks)


def _valid_cidr(value: str) -> bool:
    m = _CIDR_RE.match(value)
    return bool(m) and all(int(o) <= 255 for o in m.groups()[:4]) and 16 <= int(m.group(5)) <= 24


def _database(env: _Reader, *, account: str | None, region: str | None
              ) -> DatabaseConfig | ExternalDatabaseConfig | None:
    """`database`: the RDS instance the stateful stack creates, or `external`, the team's own."""
    d = env.section("database")
    d.unknown_keys({*_RDS_KEYS, "external"})
    if d.raw.get("external") is not None:
        return _external_database(d, account=account, region=region)
    before = len(d.problems)
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
    return DatabaseConfig(**database) if len(d.problems) == before else None


def _external_database(d: _Reader, *, account: str | None, region: str | None) -> ExternalDatabaseConfig | None:
    before = len(d.problems)
    for key in _RDS_KEYS:
        if key in d.raw:
            d._bad(key, "sizes the RDS instance the stack creates, and with database.external it creates none: "
                        "remove it (or remove external to keep the stack's own database)")
    if not isinstance(d.raw["external"], dict):
        d.section("external", hint='give {"host": ..., "port": 5432, "name": ..., "secret_arn": ...} '
                                   "(infra/README.md, \"The database\")")
        return None
    e = d.section("external")
    e.unknown_keys(_EXTERNAL_KEYS)
    host = e.get("host", str, hint="the database's DNS name as RDS gives it, e.g. "
                                   "shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com, without scheme or port")
    if host is not None:
        if _IPV4_RE.match(host):
            e._bad("host", f"{host!r} is an IP address: give the endpoint's DNS name (the containers connect "
                           "with sslmode=verify-full, which checks that the certificate names the host)")
        elif len(host) > 253 or not _HOSTNAME_RE.match(host):
            e._bad("host", f"{host!r} is not a DNS name: give the endpoint's host name only, e.g. "
                           "shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com (no scheme, no port: port is its own key)")
    port = e.get("port", int, check=lambda v: 1 <= v <= 65535, hint="the database's port, 1 to 65535 (Postgres: 5432)")
    name = e.get("name", str, check=_PG_IDENTIFIER_RE.match,
                 hint="the name of the team's database (a Postgres identifier: letters, digits, _ and $, not "
                      "starting with a digit, at most 63 characters), e.g. \"shop\"")
    secret_arn = _secret_arn(e, "secret_arn", account=account, region=region,
                             what="an RDS-format secret (JSON keys username and password)", example="shop/db")
    kms_key_arn = _kms_key_arn(e, "kms_key_arn", region=region)
    security_group_id = e.get("security_group_id", str, optional=True, check=_SECURITY_GROUP_RE.match,
                              hint="the database's security group id, sg- and 8 or 17 hex digits, in this "
                                   "environment's account; leave it out to manage its ingress yourself")
    if len(d.problems) > before:
        return None
    return ExternalDatabaseConfig(host=host, port=port, name=name, secret_arn=secret_arn, kms_key_arn=kms_key_arn,
                                  security_group_id=security_group_id)


def _secret_arn(r: _Reader, key: str, *, account: str | None, region: str | None, what: str,
                example: str) -> str | None:
    """A complete Secrets Manager ARN of this environment's account and region."""
    hint = (f"the complete ARN of {what}, with the six characters Secrets Manager appends to the name, e.g. "
            f"arn:aws:secretsmanager:{region or 'eu-west-1'}:{account or '333333333333'}:secret:{example}-AbCdEf "
            "(`aws secretsmanager describe-secret --secret-id <name> --query ARN`)")
    arn = r.get(key, str, hint=hint)
    if arn is None:
        return None
    m = _SECRET_ARN_RE.match(arn)
    if m is None:
        r._bad(key, f"{arn!r} is not valid: {hint}")
        return None
    if m["partition"] != _partition(m["region"]):
        r._bad(key, f"{arn!r}: region {m['region']} is in partition {_partition(m['region'])}, not "
                    f"{m['partition']}: copy the ARN as Secrets Manager shows it")
        return None
    if account and region and (m["account"], m["region"]) != (account, region):
        # Catches a block copied from another environment (staging's tasks on prod's credentials),
        # and a secret the execution role could not read without a resource policy and a customer
        # key in the other account, neither of which this app manages.
        r._bad(key, f"{arn!r} is a secret of account {m['account']} in {m['region']}, but this environment "
                    f"deploys to {account} in {region}: name this environment's own secret (copy or replicate it "
                    f"into {account}/{region})")
        return None
    return arn


def _kms_key_arn(r: _Reader, key: str, *, region: str | None) -> str | None:
    """The optional customer KMS key of a secret, by its key ARN, in the environment's region."""
    arn = r.get(key, str, optional=True, check=_KMS_KEY_ARN_RE.match,
                hint="the ARN of the customer key that encrypts the secret, arn:aws:kms:<region>:<account>:key/<key "
                     "id> (not an alias); leave it out for the default aws/secretsmanager key")
    if arn is None:
        return None
    m = _KMS_KEY_ARN_RE.match(arn)
    if m["partition"] != _partition(m["region"]):
        r._bad(key, f"{arn!r}: region {m['region']} is in partition {_partition(m['region'])}, not "
                    f"{m['partition']}: copy the key ARN as KMS shows it")
        return None
    if region and m["region"] != region:
        r._bad(key, f"{arn!r} is a key in {m['region']}, not {region}: a secret is encrypted with a key of its "
                    "own region, so name that key")
        return None
    return arn


_APPLICATION_KEYS = {"image", "task_modules", "catalog", "celery_app", "schedules", "python_path", "environment",
                     "secrets"}


def _application(env: _Reader, *, base_dir: Path, account: str | None, region: str | None
                 ) -> ApplicationConfig | None:
    """The `application` block: the team's image, task modules, catalog (loaded here) and settings."""
    if not isinstance(env.raw.get("application"), dict):
        env._bad("application", "missing or not an object: add it with the team's image, task_modules and "
                                "catalog (infra/README.md, \"The application\"); a deployed environment never "
                                "runs the demo tasks")
        return None
    a = env.section("application")
    before = len(a.problems)
    a.unknown_keys(_APPLICATION_KEYS)
    image = _image(a, base_dir=base_dir)
    task_modules = _task_modules(a)
    python_path = _python_path(a, base_dir=base_dir)

    spec = a.get("catalog", str, optional=True, check=_is_spec,
                 hint='the module:ATTRIBUTE of your pcelery Catalog, e.g. "shop.queues:CATALOG"')
    if spec is None and a.raw.get("catalog") is None:
        spec = DEFAULT_CATALOG
    if spec is not None and _is_harness(spec):
        a._bad("catalog", f"{spec!r} is the dev harness's (devstack/), which never reaches an image: "
                          "name your own catalog")
        spec = None
    catalog = None
    if spec is not None and python_path is not None:
        catalog = _load_catalog(a, spec, python_path)

    celery_app = a.get("celery_app", str, optional=True, check=_is_spec,
                       hint='the module:attribute of your Celery app, e.g. "shopsite.celery:app", or leave it '
                            "out for the product's own app")
    if celery_app is not None and _is_harness(celery_app):
        a._bad("celery_app", f"{celery_app!r} is the dev harness's (devstack/), which never reaches an image: "
                             "name your own Celery app, or leave it out for the product's")
    schedules_spec = a.get("schedules", str, optional=True, check=_is_spec,
                           hint='the module:ATTRIBUTE of your list of pcelery.scheduler.Schedule, e.g. '
                                '"shop.schedules:SCHEDULES", or leave it out for no scheduler')
    if schedules_spec is not None and _is_harness(schedules_spec):
        a._bad("schedules", f"{schedules_spec!r} is the dev harness's (devstack/), which never reaches an image: "
                            "name your own schedules, or leave it out for no scheduler")
        schedules_spec = None
    schedules: tuple | None = ()
    if schedules_spec is not None and python_path is not None:
        schedules = _load_schedules(a, schedules_spec, python_path, catalog=catalog)
    environment = _environment(a)
    secrets = _secrets(a, environment=environment, account=account, region=region)

    if len(a.problems) > before:
        return None
    return ApplicationConfig(
        image=image,
        task_modules=task_modules,
        catalog_spec=spec,
        catalog=catalog,
        celery_app=celery_app,
        schedules_spec=schedules_spec,
        schedules=schedules,
        python_path=python_path,
        environment=environment,
        secrets=secrets,
    )


def _image(a: _Reader, *, base_dir: Path) -> ImageConfig | None:
    hint = ('add {"directory": "<build context>"} (CDK builds it at deploy) or {"uri": "<registry>/<repository>:'
            '<tag>"} (an image that already exists)')
    if not isinstance(a.raw.get("image"), dict):
        a.section("image", hint=hint)
        return None
    i = a.section("image")
    i.unknown_keys({"directory", "file", "build_args", "uri"})
    has_directory, has_uri = i.raw.get("directory") is not None, i.raw.get("uri") is not None
    if has_directory == has_uri:
        i._bad_here(f"has both directory and uri: keep one of them: {hint}" if has_uri
                    else f"has neither directory nor uri: set one: {hint}")
        return None
    if has_uri:
        for key in ("file", "build_args"):
            if key in i.raw:
                i._bad(key, "applies only to a directory build: remove it (the image at uri is built already)")
        uri = i.get("uri", str, hint="an image reference such as "
                                     "333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop:1.4.2")
        return None if uri is None else _image_uri(i, uri)

    directory = i.get("directory", str, check=_is_relative,
                      hint='the build context, relative to the directory of cdk.json, e.g. "examples/django_shop"')
    file = i.get("file", str, optional=True, check=_is_relative,
                 hint='the Dockerfile, relative to directory, e.g. "docker/Dockerfile.worker"')
    build_args = i.get("build_args", dict, optional=True, hint='an object of strings, e.g. {"PYTHON_VERSION": "3.11"}')
    for name, value in (build_args or {}).items():
        if not isinstance(value, str):
            i._bad(f"build_args.{name}", f"{value!r} is a {type(value).__name__}, expected str: quote it")
    if directory is None:
        return None
    context = (base_dir / directory).resolve()
    if not context.is_dir():
        i._bad("directory", f"{directory!r} is not a directory under {base_dir}: give the build context's path "
                            "relative to the directory of cdk.json")
        return None
    dockerfile = context / (file or "Dockerfile")
    if not dockerfile.is_file():
        if file:
            i._bad("file", f"{file!r}: there is no {dockerfile}: give the Dockerfile's path relative to directory")
        else:
            i._bad("directory", f"{directory!r} has no Dockerfile: add one, or name yours with image.file")
    return ImageConfig(directory=context, file=file, build_args=dict(build_args or {}))


def _image_uri(i: _Reader, uri: str) -> ImageConfig | None:
    ecr = _ECR_URI_RE.match(uri)
    if ecr is None and ".dkr.ecr." in uri:
        i._bad("uri", f"{uri!r} is not a valid ECR image URI: use <12-digit account>.dkr.ecr.<region>.amazonaws.com/"
                      "<repository>:<tag> (or @sha256:<digest>), the repository in lower case")
        return None
    found = ecr or _IMAGE_URI_RE.match(uri)
    if found is None:
        i._bad("uri", f"{uri!r} is not an image reference: use [<registry>/]<repository>:<tag> (or @sha256:<digest>) "
                      "in lower case, e.g. 333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop:1.4.2")
        return None
    tag, digest = found["tag"], found["digest"]
    if digest is None and tag in (None, "latest"):
        # The task definitions would read the same on every deploy, so nothing would roll out,
        # and every task that starts later would pull whatever the tag points to by then.
        i._bad("uri", f"{uri!r} does not pin a version: add a release tag (:1.4.2) or a digest (@sha256:...); "
                      "with a moving tag a deploy changes no task definition and new tasks mix versions")
        return None
    if ecr is None:
        return ImageConfig(uri=uri)
    return ImageConfig(uri=uri, ecr=EcrImage(
        account=ecr["account"], region=ecr["region"], partition="aws-cn" if ecr["cn"] else "aws",
        repository=ecr["repository"], tag_or_digest=digest or tag,
    ))


def _task_modules(a: _Reader) -> tuple[str, ...] | None:
    modules = a.get("task_modules", list, hint='the modules that declare your tasks, e.g. ["shop.tasks"]: a '
                                              "deployed environment never runs the demo tasks")
    if modules is None:
        return None
    if not modules:
        a._bad("task_modules", '[] is empty: name the modules that declare your tasks, e.g. ["shop.tasks"] '
                               "(a deployed environment never runs the demo tasks)")
        return None
    before = len(a.problems)
    for n, module in enumerate(modules):
        key = f"task_modules[{n}]"
        if not isinstance(module, str) or not _is_module(module):
            a._bad(key, f"{module!r} is not a module name: give an importable dotted name such as \"shop.tasks\"")
        elif _is_harness(module):
            a._bad(key, f"{module!r} is the dev harness's (devstack/), which never reaches an image: name the "
                        "modules of your own tasks")
        elif module in modules[:n]:
            a._bad(key, f"{module!r} is named twice: remove one")
    return tuple(modules) if len(a.problems) == before else None


def _python_path(a: _Reader, *, base_dir: Path) -> tuple[Path, ...] | None:
    hint = 'directories relative to the directory of cdk.json, e.g. ["examples/django_shop"]'
    entries = a.get("python_path", list, optional=True, hint=hint)
    if entries is None:
        return None if a.raw.get("python_path") is not None else ()
    before, paths = len(a.problems), []
    for n, entry in enumerate(entries):
        key = f"python_path[{n}]"
        if not isinstance(entry, str) or not entry.strip():
            a._bad(key, f"{entry!r} is not a path: give {hint}")
        elif not _is_relative(entry):
            a._bad(key, f"{entry!r} is absolute: make it relative to the directory of cdk.json, so every "
                        "checkout synthesizes alike")
        elif not (base_dir / entry).is_dir():
            a._bad(key, f"{entry!r} is not a directory under {base_dir}: give {hint}")
        else:
            paths.append((base_dir / entry).resolve())
    return tuple(paths) if len(a.problems) == before else None


def _load_catalog(a: _Reader, spec: str, python_path: tuple[Path, ...]) -> Catalog | None:
    """The Catalog `spec` names, imported with python_path first on sys.path."""
    try:
        with _importable_from(python_path):
            return load_catalog(spec)
    except Exception as exc:  # noqa: BLE001 - whatever the team's module raises fails synth, named
        reason = str(exc) if isinstance(exc, CatalogError) else (
            f"catalog spec {spec!r} cannot be imported ({type(exc).__name__}: {exc})")
        where = [str(p) for p in python_path]
        a._bad("catalog", f"{reason}; synth imports it with application.python_path {where} first on sys.path: "
                          "name a pcelery.catalog.Catalog as module:ATTRIBUTE, and put the directory that holds "
                          "its module in python_path")
        return None


def _load_schedules(a: _Reader, spec: str, python_path: tuple[Path, ...], *,
                    catalog: Catalog | None) -> tuple[Schedule, ...] | None:
    """The schedules `spec` names, imported with python_path first on sys.path, as the scheduler
    loads them (pcelery.scheduler.load_schedules: a list of Schedule, each valid, names unique),
    and each explicit queue in the environment's catalog. Task names are not checked: that needs
    the team's task modules (Django...), which the scheduler imports when it starts."""
    from pcelery.scheduler import load_schedules

    where = [str(p) for p in python_path]
    try:
        with _importable_from(python_path):
            schedules = tuple(load_schedules(spec))
    except Exception as exc:  # noqa: BLE001 - whatever the team's module raises fails synth, named
        a._bad("schedules", f"{exc}; synth imports it as the scheduler would, with application.python_path {where} "
                            "first on sys.path: name a list of pcelery.scheduler.Schedule as module:ATTRIBUTE, put "
                            "the directory that holds its module in python_path, and keep that module importable "
                            "without Django or Celery")
        return None
    if not schedules:
        a._bad("schedules", f"{spec!r} is an empty list: add a Schedule, or leave schedules out (no scheduler "
                            "service is then deployed)")
        return None
    if catalog is not None:
        for schedule in schedules:
            if schedule.queue is not None and schedule.queue not in catalog.names():
                a._bad("schedules", f"schedule {schedule.name!r} sends to queue {schedule.queue!r}, which the "
                                    f"catalog lacks: use one of {', '.join(catalog.names())} (application.catalog), "
                                    "or leave queue out for the task's declared queue")
    return schedules


@contextmanager
def _importable_from(paths: tuple[Path, ...]) -> Iterator[None]:
    """`paths` first on sys.path for the duration: reading the config leaves no trace on what
    later imports resolve to (the imported catalog module itself stays in sys.modules)."""
    added = [str(p) for p in paths if str(p) not in sys.path]
    sys.path[:0] = added
    importlib.invalidate_caches()  # a directory made since start-up (tests) must be seen
    try:
        yield
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)


def _environment(a: _Reader) -> dict[str, str] | None:
    environment = a.get("environment", dict, optional=True,
                        hint='an object of names and strings, e.g. {"DJANGO_SETTINGS_MODULE": "shop.settings"}')
    if environment is None:
        return None if a.raw.get("environment") is not None else {}
    before = len(a.problems)
    for name, value in environment.items():
        key = f"environment.{name}"
        if not _ENV_NAME_RE.match(name):
            a._bad(key, "is not a variable name: use letters, digits and _, not starting with a digit")
        elif _is_reserved(name):
            a._bad(key, f"is set by the CDK app, which owns {_OWNED}: remove it (infra/README.md, "
                        "\"Container configuration\", lists what each container gets)")
        elif _CREDENTIAL_NAME_RE.search(name.upper()):
            a._bad(key, "looks like a credential, and environment lands in the task definition in plain text: "
                        "remove it and keep secrets out of cdk.json")
        elif not isinstance(value, str):
            a._bad(key, f"{value!r} is a {type(value).__name__}, expected str: quote it")
    return dict(environment) if len(a.problems) == before else None


def _secrets(a: _Reader, *, environment: Mapping[str, str] | None, account: str | None,
             region: str | None) -> dict[str, SecretReference] | None:
    """`secrets`: variable name -> {"arn", "field", "kms_key_arn"}, injected by ECS at task start."""
    example = ('{"DJANGO_SECRET_KEY": {"arn": "arn:aws:secretsmanager:<region>:<account>:secret:shop/django-AbCdEf", '
               '"field": "secret_key"}}')
    secrets = a.get("secrets", dict, optional=True, hint=f"an object of variable names and secrets, e.g. {example}")
    if secrets is None:
        return None if a.raw.get("secrets") is not None else {}
    before, found = len(a.problems), {}
    for name, value in secrets.items():
        key = f"secrets.{name}"
        if not _ENV_NAME_RE.match(name):
            a._bad(key, "is not a variable name: use letters, digits and _, not starting with a digit")
        elif _is_reserved(name):
            a._bad(key, f"is set by the CDK app, which owns {_OWNED}: remove it (infra/README.md, \"Container "
                        "configuration\", lists what each container gets)")
        elif name in (environment if environment is not None else _dict_or_empty(a.raw.get("environment"))):
            a._bad(key, "is also in application.environment: keep it in one place (a secret in secrets)")
        elif isinstance(value, str):
            a._bad(key, f"{value!r} is a str, expected an object: give {{\"arn\": \"<complete secret ARN>\", "
                        "\"field\": \"<JSON key>\"} (field optional) rather than an ECS valueFrom string")
        elif not isinstance(value, dict):
            a._bad(key, f"{value!r} is a {type(value).__name__}, expected an object: give {{\"arn\": ..., "
                        "\"field\": ...}")
        else:
            found[name] = _secret_reference(a.section("secrets").section(name), account=account, region=region)
    if len(a.problems) > before:
        return None
    return found


def _partition(region: str) -> str:
    """The ARN partition of a region: aws-cn for China, aws-us-gov for GovCloud, else aws."""
    if region.startswith("cn-"):
        return "aws-cn"
    return "aws-us-gov" if region.startswith("us-gov-") else "aws"


def _dict_or_empty(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _secret_reference(s: _Reader, *, account: str | None, region: str | None) -> SecretReference | None:
    s.unknown_keys(_SECRET_KEYS)
    arn = _secret_arn(s, "arn", account=account, region=region, what="the secret", example="shop/django")
    # ECS's valueFrom is <arn>:<json key>:<version stage>:<version id>: a ':' in the key would shift them.
    field_ = s.get("field", str, optional=True, check=lambda v: bool(v.strip()) and ":" not in v,
                   hint="the JSON key to read from the secret's value, e.g. \"secret_key\" (no ':'); leave it out to "
                        "pass the whole value")
    kms_key_arn = _kms_key_arn(s, "kms_key_arn", region=region)
    if arn is None:
        return None
    return SecretReference(arn=arn, field=field_, kms_key_arn=kms_key_arn)


_OWNED = ", ".join([*(f"{p}*" for p in RESERVED_ENV_PREFIXES), *RESERVED_ENV_NAMES])


def _is_reserved(name: str) -> bool:
    return name.upper().startswith(RESERVED_ENV_PREFIXES) or name.upper() in RESERVED_ENV_NAMES


def _is_module(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _is_spec(value: str) -> bool:
    """module:attribute, the form of PCELERY_CATALOG and PCELERY_CELERY_APP."""
    module, _, attribute = value.partition(":")
    return _is_module(module) and attribute.isidentifier()


def _is_harness(name: str) -> bool:
    module = name.partition(":")[0]
    return module == HARNESS_PACKAGE or module.startswith(HARNESS_PACKAGE + ".")


def _is_relative(value: str) -> bool:
    return bool(value.strip()) and not PurePosixPath(value).is_absolute()


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


def load_configs(context_lookup, *, base_dir: Path) -> list[EnvConfig]:
    """Configs of the selected environments. `context_lookup(key)` is `app.node.try_get_context`;
    `base_dir` is the directory of cdk.json (app.py's), which the application's paths start from."""
    block = context_lookup(CONTEXT_KEY)
    if not isinstance(block, dict):
        raise ConfigError(
            f"context {CONTEXT_KEY} is missing: run the app through the CDK CLI from the repo root "
            "(`npx cdk synth`), which passes cdk.json's context; in code, pass it to cdk.App(context=...)"
        )
    configs, errors = [], []
    for name in selected_envs(context_lookup(SELECT_KEY)):
        try:
            configs.append(parse_env(name, block.get(name), base_dir=base_dir))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    return configs
