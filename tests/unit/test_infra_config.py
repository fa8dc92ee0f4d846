"""infra/config.py: cdk.json context -> one typed, validated EnvConfig per environment.

No synth here: infra.config is pure Python (the catalog, the scheduler's Schedule and the standard
library), so these run without node. Loading `application.catalog` and `application.schedules`
imports the example shop's examples/django_shop/shop/queues.py and shop/schedules.py through its
python_path, which import pcelery.catalog and pcelery.scheduler only. Everything that
synthesizes is in tests/integration/test_infra.py, including app.py failing on a bad key (it
starts a process).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import replace

import pytest
from cdk_support import REPO_ROOT, cdk_context, configs, context_with

from infra.config import (
    CONTEXT_KEY,
    DEFAULT_CATALOG,
    ApplicationConfig,
    ConfigError,
    DatabaseConfig,
    EcrImage,
    ExternalDatabaseConfig,
    ImageConfig,
    SchedulerConfig,
    SecretReference,
    load_configs,
    parse_env,
    selected_envs,
)
from pcelery.catalog import CATALOG, Catalog

# At collection, not in a test: croniter's import runs `file` once (platform.architecture), and
# the unit tier refuses processes inside tests. infra.config imports it when it loads schedules.
from pcelery.scheduler import Schedule

SHOP = REPO_ROOT / "examples" / "django_shop"
DIGEST = "sha256:" + "ab" * 32


def parse(env: str, ctx: dict, base_dir=REPO_ROOT):
    return parse_env(env, ctx[CONTEXT_KEY][env], base_dir=base_dir)


def test_cdk_json_gives_one_typed_config_per_environment():
    found = configs()
    assert set(found) == {"dev", "staging", "prod"}
    prod, dev = found["prod"], found["dev"]
    assert prod.database.multi_az and prod.protection.deletion_protection and prod.protection.termination_protection
    assert prod.database.rotation_days > 0 and prod.network.flow_logs and prod.network.interface_endpoints
    assert dev.cache is None and prod.cache is not None
    assert dev.workers.min_tasks == 0  # dev scales to zero
    assert all(len(c.availability_zones) >= 2 for c in found.values())
    # Every environment keeps the product's own RDS instance; database.external is opt-in.
    for c in found.values():
        assert isinstance(c.database, DatabaseConfig) and c.rds is c.database and c.external_database is None


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
        parse("prod", ctx)
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once():
    ctx = context_with("dev", "region", "Mars")
    ctx[CONTEXT_KEY]["dev"]["workers"]["min_tasks"] = 9
    ctx[CONTEXT_KEY]["dev"]["workers"]["max_tasks"] = 2
    ctx[CONTEXT_KEY]["dev"]["application"]["task_modules"] = ["devstack.tasks"]
    with pytest.raises(ConfigError) as err:
        parse("dev", ctx)
    assert ".dev.region:" in str(err.value) and ".dev.workers.min_tasks:" in str(err.value)
    assert ".dev.application.task_modules[0]:" in str(err.value)


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


# --------------------------------------------------------------------------- application


def test_application_block_is_parsed_with_the_teams_catalog_loaded():
    dev, staging, prod = (configs()[e] for e in ("dev", "staging", "prod"))
    app = dev.application
    assert isinstance(app, ApplicationConfig)
    assert app.image == ImageConfig(directory=SHOP, file=None, build_args={})
    assert app.task_modules == ("shop.tasks",)
    assert app.catalog_spec == "shop.queues:CATALOG"
    # Loaded through python_path from the shop's own module, not the product's catalog.
    assert app.catalog is sys.modules["shop.queues"].CATALOG is dev.catalog
    assert sys.modules["shop.queues"].__file__ == str(SHOP / "shop" / "queues.py")
    assert isinstance(app.catalog, Catalog) and app.catalog is not CATALOG
    assert app.celery_app == "shopsite.celery:app"
    assert app.python_path == (SHOP,)
    assert app.environment == {"DJANGO_SETTINGS_MODULE": "shopsite.settings"}
    # The shop's Django SECRET_KEY: each environment's own secret, in its own account and region.
    for c in (dev, staging, prod):
        assert c.application.secrets == {"DJANGO_SECRET_KEY": SecretReference(
            arn=f"arn:aws:secretsmanager:{c.region}:{c.account}:secret:shop/{c.name}/django-AbCdEf",
            field="secret_key")}
    assert replace(staging.application, secrets=app.secrets) == app
    # prod deploys a pinned image from ECR: the parts CDK needs to grant the pull.
    assert prod.application.image == ImageConfig(
        uri="333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop:1.0.0",
        ecr=EcrImage(account="333333333333", region="eu-west-1", partition="aws", repository="shop",
                     tag_or_digest="1.0.0"),
    )
    assert prod.application.image.ecr.repository_arn == "arn:aws:ecr:eu-west-1:333333333333:repository/shop"
    assert prod.application.image.ecr.region == prod.region
    assert replace(prod.application, image=app.image, secrets=app.secrets) == app
    # The shop's queues are the product's, contract for contract (only the prose differs): the
    # synthesized queues, services and alarms stay what they were.
    assert [replace(q, description="") for q in app.catalog] == [replace(q, description="") for q in CATALOG]


def test_loading_the_catalog_leaves_sys_path_as_it_was():
    before = list(sys.path)
    parse("dev", cdk_context())
    assert sys.path == before


def test_optional_application_keys_default_to_the_products_catalog_and_celery_app():
    ctx = context_with("dev", "application", {"image": {"directory": "examples/django_shop"},
                                              "task_modules": ["shop.tasks"]})
    del ctx[CONTEXT_KEY]["dev"]["scheduler"]  # sizes a scheduler, which needs application.schedules
    app = parse("dev", ctx).application
    assert app.catalog_spec == DEFAULT_CATALOG == "pcelery.catalog:CATALOG"
    assert app.catalog is CATALOG
    assert app.celery_app is None and app.python_path == () and app.environment == {} and app.secrets == {}
    # No schedules, no scheduler; the count keeps its default, unused.
    assert app.schedules_spec is None and app.schedules == ()


URI = "333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop:1.0.0"


@pytest.mark.parametrize("image, expected", [
    ({"directory": "examples/django_shop", "file": "Dockerfile", "build_args": {"PYTHON_VERSION": "3.11"}},
     ImageConfig(directory=SHOP, file="Dockerfile", build_args={"PYTHON_VERSION": "3.11"})),
    ({"uri": f"333333333333.dkr.ecr.eu-west-1.amazonaws.com/team/shop@{DIGEST}"},
     ImageConfig(uri=f"333333333333.dkr.ecr.eu-west-1.amazonaws.com/team/shop@{DIGEST}",
                 ecr=EcrImage(account="333333333333", region="eu-west-1", partition="aws", repository="team/shop",
                              tag_or_digest=DIGEST))),
    # With both, the digest is what is pulled.
    ({"uri": f"{URI}@{DIGEST}"},
     ImageConfig(uri=f"{URI}@{DIGEST}", ecr=EcrImage(account="333333333333", region="eu-west-1", partition="aws",
                                                   repository="shop", tag_or_digest=DIGEST))),
    ({"uri": "444455556666.dkr.ecr.cn-north-1.amazonaws.com.cn/shop:2"},
     ImageConfig(uri="444455556666.dkr.ecr.cn-north-1.amazonaws.com.cn/shop:2",
                 ecr=EcrImage(account="444455556666", region="cn-north-1", partition="aws-cn", repository="shop",
                              tag_or_digest="2"))),
    ({"uri": "ghcr.io/acme/shop:1.4.2"}, ImageConfig(uri="ghcr.io/acme/shop:1.4.2")),
    ({"uri": "registry.example.com:5000/shop:1.4.2"}, ImageConfig(uri="registry.example.com:5000/shop:1.4.2")),
])
def test_both_image_forms_parse(image, expected):
    assert parse("prod", context_with("prod", "application.image", image)).application.image == expected


P = "pcelery:environments.prod.application"


@pytest.mark.parametrize("path, value, expected", [
    ("application", KeyError,
     "pcelery:environments.prod.application: missing or not an object: add it with the team's image, task_modules "
     "and catalog"),
    ("application.task_modules", KeyError,
     f"{P}.task_modules: missing: set it (list, the modules that declare your tasks, e.g. [\"shop.tasks\"]: a "
     "deployed environment never runs the demo tasks)"),
    ("application.task_modules", [],
     f"{P}.task_modules: [] is empty: name the modules that declare your tasks"),
    ("application.task_modules", "shop.tasks", f"{P}.task_modules: 'shop.tasks' is a str, expected list"),
    ("application.task_modules", ["shop.tasks", "devstack.tasks"],
     f"{P}.task_modules[1]: 'devstack.tasks' is the dev harness's (devstack/), which never reaches an image: name "
     "the modules of your own tasks"),
    ("application.task_modules", ["devstack"], f"{P}.task_modules[0]: 'devstack' is the dev harness's"),
    ("application.task_modules", ["shop/tasks.py"],
     f"{P}.task_modules[0]: 'shop/tasks.py' is not a module name: give an importable dotted name"),
    ("application.task_modules", ["shop.tasks", "shop.tasks"], f"{P}.task_modules[1]: 'shop.tasks' is named twice"),
    ("application.image", KeyError, f"{P}.image: missing or not an object: add {{\"directory\""),
    ("application.image", {"directory": "examples/django_shop", "uri": URI},
     f"{P}.image: has both directory and uri: keep one of them: add {{\"directory\""),
    ("application.image", {}, f"{P}.image: has neither directory nor uri: set one: add {{\"directory\""),
    ("application.image", {"uri": URI, "file": "Dockerfile"},
     f"{P}.image.file: applies only to a directory build: remove it"),
    ("application.image", {"uri": URI, "registry": "ecr"}, f"{P}.image.registry: unknown key"),
    ("application.image.uri", "333333333333.dkr.ecr.eu-west-1.amazonaws.com/Shop:1.0.0",
     f"{P}.image.uri: '333333333333.dkr.ecr.eu-west-1.amazonaws.com/Shop:1.0.0' is not a valid ECR image URI: "
     "use <12-digit account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>"),
    ("application.image.uri", "33333.dkr.ecr.eu-west-1.amazonaws.com/shop:1.0.0",
     f"{P}.image.uri: '33333.dkr.ecr.eu-west-1.amazonaws.com/shop:1.0.0' is not a valid ECR image URI"),
    ("application.image.uri", "https://ghcr.io/acme/shop:1.4.2",
     f"{P}.image.uri: 'https://ghcr.io/acme/shop:1.4.2' is not an image reference: use [<registry>/]<repository>:"),
    ("application.image.uri", "333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop",
     f"{P}.image.uri: '333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop' does not pin a version: add a release "
     "tag (:1.4.2) or a digest"),
    ("application.image.uri", "333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop:latest",
     f"{P}.image.uri: '333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop:latest' does not pin a version"),
    ("application.image.uri", 42, f"{P}.image.uri: 42 is a int, expected str"),
    ("application.image", {"directory": "examples/nowhere"},
     f"{P}.image.directory: 'examples/nowhere' is not a directory under {REPO_ROOT}: give the build context's path "
     "relative to the directory of cdk.json"),
    ("application.image", {"directory": "/srv/shop"},
     f"{P}.image.directory: '/srv/shop' is not valid: the build context, relative to the directory of cdk.json"),
    ("application.image", {"directory": "examples"},
     f"{P}.image.directory: 'examples' has no Dockerfile: add one, or name yours with image.file"),
    ("application.image", {"directory": "examples/django_shop", "file": "Dockerfile.web"},
     f"{P}.image.file: 'Dockerfile.web': there is no {SHOP / 'Dockerfile.web'}: give the Dockerfile's path"),
    ("application.image", {"directory": "examples/django_shop", "build_args": {"WORKERS": 3}},
     f"{P}.image.build_args.WORKERS: 3 is a int, expected str: quote it"),
    ("application.catalog", "shop.nosuch:CATALOG",
     f"{P}.catalog: catalog spec 'shop.nosuch:CATALOG' cannot be loaded (No module named 'shop.nosuch')"),
    ("application.catalog", "shop.queues:QUEUES",
     f"{P}.catalog: catalog spec 'shop.queues:QUEUES' cannot be loaded (module 'shop.queues' has no attribute"),
    ("application.catalog", "shop.queues:Catalog",
     f"{P}.catalog: catalog spec 'shop.queues:Catalog' names a type, not a Catalog"),
    ("application.catalog", "shop.queues",
     f"{P}.catalog: 'shop.queues' is not valid: the module:ATTRIBUTE of your pcelery Catalog"),
    ("application.catalog", "devstack:DEMO_CATALOG",
     f"{P}.catalog: 'devstack:DEMO_CATALOG' is the dev harness's (devstack/), which never reaches an image"),
    ("application.celery_app", "shopsite.celery",
     f"{P}.celery_app: 'shopsite.celery' is not valid: the module:attribute of your Celery app"),
    ("application.celery_app", "devstack.demo:app", f"{P}.celery_app: 'devstack.demo:app' is the dev harness's"),
    ("application.python_path", ["/srv/shop"],
     f"{P}.python_path[0]: '/srv/shop' is absolute: make it relative to the directory of cdk.json"),
    ("application.python_path", ["examples/nowhere"],
     f"{P}.python_path[0]: 'examples/nowhere' is not a directory under {REPO_ROOT}"),
    ("application.python_path", "examples/django_shop",
     f"{P}.python_path: 'examples/django_shop' is a str, expected list"),
    ("application.environment", {"AWS_PROFILE": "shop"},
     f"{P}.environment.AWS_PROFILE: is set by the CDK app, which owns PCELERY_*, DB_*, REDIS_*, AWS_*, "
     "DATABASE_URL: remove it"),
    ("application.environment", {"PCELERY_TASK_MODULES": "shop.tasks"},
     f"{P}.environment.PCELERY_TASK_MODULES: is set by the CDK app"),
    ("application.environment", {"DB_HOST": "db.example.com"}, f"{P}.environment.DB_HOST: is set by the CDK app"),
    ("application.environment", {"REDIS_URL": "rediss://x"}, f"{P}.environment.REDIS_URL: is set by the CDK app"),
    ("application.environment", {"DATABASE_URL": "postgres://x"},
     f"{P}.environment.DATABASE_URL: is set by the CDK app"),
    ("application.environment", {"DJANGO_SECRET_KEY": "x"},
     f"{P}.environment.DJANGO_SECRET_KEY: looks like a credential, and environment lands in the task definition "
     "in plain text: remove it"),
    ("application.environment", {"WEB_CONCURRENCY": 4},
     f"{P}.environment.WEB_CONCURRENCY: 4 is a int, expected str: quote it"),
    ("application.environment", {"2FA_MODE": "off"}, f"{P}.environment.2FA_MODE: is not a variable name"),
    ("application.tasks", ["shop.tasks"], f"{P}.tasks: unknown key"),
])
def test_bad_or_missing_application_key_names_the_key_and_the_fix(path, value, expected):
    with pytest.raises(ConfigError) as err:
        parse("prod", context_with("prod", path, value))
    assert expected in str(err.value)


def test_a_missing_application_is_named_once_per_environment():
    ctx = copy.deepcopy(cdk_context())
    for env in ("dev", "staging", "prod"):
        del ctx[CONTEXT_KEY][env]["application"]
    with pytest.raises(ConfigError) as err:
        load_configs({**ctx, "env": None}.get, base_dir=REPO_ROOT)
    lines = str(err.value).splitlines()
    for env in ("dev", "staging", "prod"):
        # The section's own message, without a cascade of its keys.
        assert [ln for ln in lines if f".{env}.application" in ln] == [
            f"  pcelery:environments.{env}.application: missing or not an object: add it with the team's image, "
            "task_modules and catalog (infra/README.md, \"The application\"); a deployed environment never runs "
            "the demo tasks"]


def _application_in(tmp_path, module: str, source: str, spec: str) -> dict:
    """prod's context with a catalog module of the test's own, imported from tmp_path."""
    (tmp_path / f"{module}.py").write_text(source)
    ctx = context_with("prod", "application.python_path", ["."])
    ctx[CONTEXT_KEY]["prod"]["application"]["catalog"] = spec
    return ctx


def test_a_catalog_of_the_teams_own_module_is_what_the_environment_gets(tmp_path):
    ctx = _application_in(tmp_path, "pcelery_test_three_queues", (
        "from dataclasses import replace\n"
        "from pcelery.catalog import CATALOG as BASE, Catalog\n"
        "CATALOG = Catalog(queues=(*BASE.queues, replace(BASE.get('default'), name='reports')))\n"
    ), "pcelery_test_three_queues:CATALOG")
    prod = parse("prod", ctx, base_dir=tmp_path)
    assert [q.name for q in prod.catalog] == ["default", "long", "reports"]
    assert prod.application.python_path == (tmp_path.resolve(),)


@pytest.mark.parametrize("module, source, expected", [
    ("pcelery_test_raising_queues", "raise RuntimeError('settings not configured')\n",
     "catalog spec 'pcelery_test_raising_queues:CATALOG' cannot be imported (RuntimeError: settings not configured)"),
    # A contract that cannot hold fails where the catalog is built: at import, here at synth.
    ("pcelery_test_empty_queues", "from pcelery.catalog import Catalog\nCATALOG = Catalog(queues=())\n",
     "catalog has no queues: add at least one QueueContract"),
])
def test_a_catalog_module_that_fails_to_import_fails_synth_naming_the_key(tmp_path, module, source, expected):
    ctx = _application_in(tmp_path, module, source, f"{module}:CATALOG")
    with pytest.raises(ConfigError) as err:
        parse("prod", ctx, base_dir=tmp_path)
    assert f"{P}.catalog: {expected}" in str(err.value)
    assert f"python_path ['{tmp_path.resolve()}'] first on sys.path" in str(err.value)


# --------------------------------------------------------------------------- database.external

DB_SECRET = "arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/db-AbCdEf"
KEY = "arn:aws:kms:eu-west-1:333333333333:key/0123abcd-4567-89ab-cdef-0123456789ab"
EXTERNAL = {"host": "shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com", "port": 5432, "name": "shop",
            "secret_arn": DB_SECRET, "kms_key_arn": KEY, "security_group_id": "sg-0123456789abcdef0"}
D = "pcelery:environments.prod.database"


def with_external(**changes) -> dict:
    """prod's context with database = {"external": EXTERNAL with `changes`} (KeyError removes a key)."""
    external = {k: v for k, v in {**EXTERNAL, **changes}.items() if v is not KeyError}
    return context_with("prod", "database", {"external": external})


def test_an_external_database_replaces_the_stacks_own():
    prod = parse("prod", with_external())
    assert prod.database == prod.external_database == ExternalDatabaseConfig(
        host="shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com", port=5432, name="shop", secret_arn=DB_SECRET,
        kms_key_arn=KEY, security_group_id="sg-0123456789abcdef0")
    assert prod.rds is None


def test_an_external_databases_key_and_security_group_are_optional():
    prod = parse("prod", with_external(kms_key_arn=KeyError, security_group_id=KeyError, port=6432,
                                       host="shop-db.cluster-abcdefghijkl.eu-west-1.rds.amazonaws.com",
                                       name="Shop_2", secret_arn="arn:aws:secretsmanager:eu-west-1:333333333333:"
                                                                 "secret:team/shop-db-x_y+z=@.1-a1B2c3"))
    db = prod.external_database
    assert (db.kms_key_arn, db.security_group_id, db.port, db.name) == (None, None, 6432, "Shop_2")
    assert db.host == "shop-db.cluster-abcdefghijkl.eu-west-1.rds.amazonaws.com"
    # A 17-digit group id and a multi-Region key parse too.
    mrk = "arn:aws:kms:eu-west-1:444455556666:key/mrk-" + "0123456789abcdef" * 2
    db = parse("prod", with_external(security_group_id="sg-0123abcd", kms_key_arn=mrk)).external_database
    assert (db.security_group_id, db.kms_key_arn) == ("sg-0123abcd", mrk)


def test_an_external_database_refuses_every_key_of_the_stacks_own_instance():
    ctx = context_with("prod", "database.external", EXTERNAL)  # beside prod's six RDS keys
    with pytest.raises(ConfigError) as err:
        parse("prod", ctx)
    for key in ("instance_type", "allocated_storage_gib", "max_allocated_storage_gib", "multi_az",
                "backup_retention_days", "rotation_days"):
        assert (f"{D}.{key}: sizes the RDS instance the stack creates, and with database.external it creates "
                "none: remove it") in str(err.value)
    assert "external:" not in str(err.value)  # the external block itself is fine


@pytest.mark.parametrize("changes, expected", [
    ({"host": KeyError}, f"{D}.external.host: missing: set it (str, the database's DNS name"),
    ({"host": "10.30.4.17"},
     f"{D}.external.host: '10.30.4.17' is an IP address: give the endpoint's DNS name (the containers connect with "
     "sslmode=verify-full"),
    ({"host": "postgres://shop-db.example.com"},
     f"{D}.external.host: 'postgres://shop-db.example.com' is not a DNS name: give the endpoint's host name only"),
    ({"host": "shop-db.example.com:5432"}, f"{D}.external.host: 'shop-db.example.com:5432' is not a DNS name"),
    ({"host": "-shop.example.com"}, f"{D}.external.host: '-shop.example.com' is not a DNS name"),
    ({"host": ""}, f"{D}.external.host: '' is not a DNS name"),
    ({"port": 0}, f"{D}.external.port: 0 is not valid: the database's port, 1 to 65535"),
    ({"port": 65536}, f"{D}.external.port: 65536 is not valid"),
    ({"port": "5432"}, f"{D}.external.port: '5432' is a str, expected int"),
    ({"name": "shop-db"}, f"{D}.external.name: 'shop-db' is not valid: the name of the team's database (a Postgres "
                          "identifier"),
    ({"name": "1shop"}, f"{D}.external.name: '1shop' is not valid"),
    ({"name": "s" * 64}, f"{D}.external.name: '{'s' * 64}' is not valid"),
    ({"secret_arn": KeyError}, f"{D}.external.secret_arn: missing: set it (str, the complete ARN of an RDS-format "
                               "secret (JSON keys username and password)"),
    # Partial: without the six characters Secrets Manager appends, a grant would need a wildcard.
    ({"secret_arn": "arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/db"},
     f"{D}.external.secret_arn: 'arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/db' is not valid: the "
     "complete ARN of an RDS-format secret"),
    ({"secret_arn": DB_SECRET + ":username::"}, f"{D}.external.secret_arn: '{DB_SECRET}:username::' is not valid"),
    ({"secret_arn": "arn:aws:ssm:eu-west-1:333333333333:parameter/shop/db"}, f"{D}.external.secret_arn: "
     "'arn:aws:ssm:eu-west-1:333333333333:parameter/shop/db' is not valid"),
    # staging's credentials in prod's block (or any other account's or region's secret)
    ({"secret_arn": "arn:aws:secretsmanager:eu-west-1:222222222222:secret:shop/db-AbCdEf"},
     f"{D}.external.secret_arn: 'arn:aws:secretsmanager:eu-west-1:222222222222:secret:shop/db-AbCdEf' is a secret "
     "of account 222222222222 in eu-west-1, but this environment deploys to 333333333333 in eu-west-1: name this "
     "environment's own secret"),
    ({"secret_arn": "arn:aws:secretsmanager:us-east-1:333333333333:secret:shop/db-AbCdEf"},
     f"{D}.external.secret_arn: 'arn:aws:secretsmanager:us-east-1:333333333333:secret:shop/db-AbCdEf' is a secret "
     "of account 333333333333 in us-east-1"),
    ({"secret_arn": "arn:aws-cn:secretsmanager:eu-west-1:333333333333:secret:shop/db-AbCdEf"},
     f"{D}.external.secret_arn: 'arn:aws-cn:secretsmanager:eu-west-1:333333333333:secret:shop/db-AbCdEf': region "
     "eu-west-1 is in partition aws, not aws-cn"),
    ({"security_group_id": "sg-123"}, f"{D}.external.security_group_id: 'sg-123' is not valid: the database's "
                                      "security group id, sg- and 8 or 17 hex digits"),
    ({"security_group_id": "sg-0123456789ABCDEF0"}, f"{D}.external.security_group_id: 'sg-0123456789ABCDEF0' is "
                                                    "not valid"),
    ({"security_group_id": "vpc-0123456789abcdef0"}, f"{D}.external.security_group_id: 'vpc-0123456789abcdef0' is "
                                                     "not valid"),
    ({"kms_key_arn": "arn:aws:kms:eu-west-1:333333333333:alias/shop-secrets"},
     f"{D}.external.kms_key_arn: 'arn:aws:kms:eu-west-1:333333333333:alias/shop-secrets' is not valid: the ARN of "
     "the customer key that encrypts the secret, arn:aws:kms:<region>:<account>:key/<key id> (not an alias)"),
    ({"kms_key_arn": "0123abcd-4567-89ab-cdef-0123456789ab"}, f"{D}.external.kms_key_arn: "
                                                              "'0123abcd-4567-89ab-cdef-0123456789ab' is not valid"),
    ({"kms_key_arn": KEY.replace("eu-west-1", "eu-central-1")},
     f"{D}.external.kms_key_arn: '{KEY.replace('eu-west-1', 'eu-central-1')}' is a key in eu-central-1, not "
     "eu-west-1: a secret is encrypted with a key of its own region"),
    ({"user": "shop"}, f"{D}.external.user: unknown key (known: host, kms_key_arn, name, port, secret_arn, "
                       "security_group_id): remove or rename it"),
])
def test_bad_external_database_key_names_the_key_and_the_fix(changes, expected):
    with pytest.raises(ConfigError) as err:
        parse("prod", with_external(**changes))
    assert expected in str(err.value)


@pytest.mark.parametrize("database, expected", [
    ({"external": "shop-db.example.com"}, f"{D}.external: missing or not an object: give {{\"host\": ..."),
    ({"external": {}, "instance_type": "t4g.micro"}, f"{D}.instance_type: sizes the RDS instance"),
    ({"external": {}}, f"{D}.external.host: missing"),
    ({"extrenal": EXTERNAL}, f"{D}.extrenal: unknown key (known: allocated_storage_gib, backup_retention_days, "
                             "external, instance_type"),
])
def test_a_malformed_database_block_names_the_key(database, expected):
    with pytest.raises(ConfigError) as err:
        parse("prod", context_with("prod", "database", database))
    assert expected in str(err.value)


def test_prod_still_refuses_destroy_with_an_external_database():
    ctx = with_external()
    ctx[CONTEXT_KEY]["prod"]["protection"]["removal_policy"] = "destroy"
    with pytest.raises(ConfigError) as err:
        parse("prod", ctx)
    assert ("pcelery:environments.prod.protection.removal_policy: 'destroy' in prod would delete the queues, with "
            "the messages in them, with the stack") in str(err.value)


# --------------------------------------------------------------------------- application.secrets

DJANGO_SECRET = "arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/django-AbCdEf"


def test_application_secrets_parse_with_optional_field_and_key():
    secrets = {"DJANGO_SECRET_KEY": {"arn": DJANGO_SECRET, "field": "secret_key"},
               "STRIPE_API_KEY": {"arn": DJANGO_SECRET.replace("django", "stripe"), "kms_key_arn": KEY},
               "sentry_dsn": {"arn": DJANGO_SECRET, "field": "sentry dsn"}}
    app = parse("prod", context_with("prod", "application.secrets", secrets)).application
    assert app.secrets == {
        "DJANGO_SECRET_KEY": SecretReference(arn=DJANGO_SECRET, field="secret_key"),
        "STRIPE_API_KEY": SecretReference(arn=DJANGO_SECRET.replace("django", "stripe"), kms_key_arn=KEY),
        "sentry_dsn": SecretReference(arn=DJANGO_SECRET, field="sentry dsn"),
    }
    assert parse("prod", context_with("prod", "application.secrets", {})).application.secrets == {}


@pytest.mark.parametrize("secrets, expected", [
    ({"DB_PASSWORD": {"arn": DJANGO_SECRET}},
     f"{P}.secrets.DB_PASSWORD: is set by the CDK app, which owns PCELERY_*, DB_*, REDIS_*, AWS_*, DATABASE_URL: "
     "remove it"),
    ({"AWS_SECRET_ACCESS_KEY": {"arn": DJANGO_SECRET}}, f"{P}.secrets.AWS_SECRET_ACCESS_KEY: is set by the CDK app"),
    ({"REDIS_AUTH_TOKEN": {"arn": DJANGO_SECRET}}, f"{P}.secrets.REDIS_AUTH_TOKEN: is set by the CDK app"),
    ({"pcelery_catalog": {"arn": DJANGO_SECRET}}, f"{P}.secrets.pcelery_catalog: is set by the CDK app"),
    ({"DATABASE_URL": {"arn": DJANGO_SECRET}}, f"{P}.secrets.DATABASE_URL: is set by the CDK app"),
    ({"DJANGO_SETTINGS_MODULE": {"arn": DJANGO_SECRET}},
     f"{P}.secrets.DJANGO_SETTINGS_MODULE: is also in application.environment: keep it in one place"),
    ({"2FA_SEED": {"arn": DJANGO_SECRET}}, f"{P}.secrets.2FA_SEED: is not a variable name"),
    ({"DJANGO_SECRET_KEY": DJANGO_SECRET + ":secret_key::"},
     f"{P}.secrets.DJANGO_SECRET_KEY: '{DJANGO_SECRET}:secret_key::' is a str, expected an object: give "
     '{"arn": "<complete secret ARN>", "field": "<JSON key>"} (field optional) rather than an ECS valueFrom string'),
    ({"DJANGO_SECRET_KEY": 42}, f"{P}.secrets.DJANGO_SECRET_KEY: 42 is a int, expected an object"),
    ({"DJANGO_SECRET_KEY": {"field": "secret_key"}},
     f"{P}.secrets.DJANGO_SECRET_KEY.arn: missing: set it (str, the complete ARN of the secret, with the six "
     "characters Secrets Manager appends to the name, e.g. arn:aws:secretsmanager:eu-west-1:333333333333:secret:"),
    ({"DJANGO_SECRET_KEY": {"arn": "arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/django"}},
     f"{P}.secrets.DJANGO_SECRET_KEY.arn: 'arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/django' is "
     "not valid: the complete ARN of the secret"),
    ({"DJANGO_SECRET_KEY": {"arn": DJANGO_SECRET.replace("333333333333", "111111111111")}},
     f"{P}.secrets.DJANGO_SECRET_KEY.arn: '{DJANGO_SECRET.replace('333333333333', '111111111111')}' is a secret of "
     "account 111111111111 in eu-west-1, but this environment deploys to 333333333333 in eu-west-1"),
    ({"DJANGO_SECRET_KEY": {"arn": DJANGO_SECRET, "field": "a:b"}},
     f"{P}.secrets.DJANGO_SECRET_KEY.field: 'a:b' is not valid: the JSON key to read from the secret's value"),
    ({"DJANGO_SECRET_KEY": {"arn": DJANGO_SECRET, "field": ""}}, f"{P}.secrets.DJANGO_SECRET_KEY.field: '' is not "
                                                                 "valid"),
    ({"DJANGO_SECRET_KEY": {"arn": DJANGO_SECRET, "version_stage": "AWSPREVIOUS"}},
     f"{P}.secrets.DJANGO_SECRET_KEY.version_stage: unknown key (known: arn, field, kms_key_arn): remove or rename "
     "it"),
    ({"DJANGO_SECRET_KEY": {"arn": DJANGO_SECRET, "kms_key_arn": "alias/shop"}},
     f"{P}.secrets.DJANGO_SECRET_KEY.kms_key_arn: 'alias/shop' is not valid"),
    (["DJANGO_SECRET_KEY"], f"{P}.secrets: ['DJANGO_SECRET_KEY'] is a list, expected dict: an object of variable "
                            "names and secrets"),
])
def test_bad_application_secret_names_the_key_and_the_fix(secrets, expected):
    with pytest.raises(ConfigError) as err:
        parse("prod", context_with("prod", "application.secrets", secrets))
    assert expected in str(err.value)


def test_external_database_and_secrets_problems_are_reported_with_everything_else():
    ctx = with_external(port=0, security_group_id="sg-1")
    ctx[CONTEXT_KEY]["prod"]["application"]["secrets"] = {"DB_USER": {"arn": DJANGO_SECRET}}
    ctx[CONTEXT_KEY]["prod"]["workers"]["cpu"] = 3
    with pytest.raises(ConfigError) as err:
        parse("prod", ctx)
    for key in (f"{D}.external.port:", f"{D}.external.security_group_id:", f"{P}.secrets.DB_USER:",
                "pcelery:environments.prod.workers.cpu:"):
        assert key in str(err.value)


# --------------------------------------------------------------------------- schedules and the scheduler


def test_each_environment_schedules_the_shops_nightly_report_with_its_own_scheduler_count():
    """application.schedules is loaded at synth from the shop's own module (through python_path),
    as the scheduler loads PCELERY_SCHEDULES; scheduler.tasks is 1 in dev and staging, 2 in prod."""
    for env, c in configs().items():
        assert c.application.schedules_spec == "shop.schedules:SCHEDULES"
        [nightly] = c.application.schedules
        assert isinstance(nightly, Schedule)
        assert nightly is sys.modules["shop.schedules"].SCHEDULES[0]
        assert (nightly.name, nightly.task, nightly.cron, nightly.timezone, nightly.missed) == (
            "nightly-sales-report", "shop.tasks.sales_report", "30 2 * * *", "Europe/Paris", "catch_up")
        assert c.scheduler == SchedulerConfig(tasks={"dev": 1, "staging": 1, "prod": 2}[env])
    assert sys.modules["shop.schedules"].__file__ == str(SHOP / "shop" / "schedules.py")


def test_the_scheduler_block_is_optional_and_defaults_to_two_tasks():
    ctx = context_with("prod", "scheduler", KeyError)
    assert parse("prod", ctx).scheduler == SchedulerConfig(tasks=2)
    assert SchedulerConfig().tasks == 2


E = "pcelery:environments.prod"


@pytest.mark.parametrize("path, value, expected", [
    ("application.schedules", "shop.schedules",
     f"{P}.schedules: 'shop.schedules' is not valid: the module:ATTRIBUTE of your list of "
     'pcelery.scheduler.Schedule, e.g. "shop.schedules:SCHEDULES", or leave it out for no scheduler'),
    ("application.schedules", 42, f"{P}.schedules: 42 is a int, expected str"),
    ("application.schedules", "devstack.schedules:SCHEDULES",
     f"{P}.schedules: 'devstack.schedules:SCHEDULES' is the dev harness's (devstack/), which never reaches an "
     "image: name your own schedules"),
    ("application.schedules", "shop.nosuch:SCHEDULES",
     f"{P}.schedules: PCELERY_SCHEDULES='shop.nosuch:SCHEDULES' cannot be loaded (ModuleNotFoundError: No module "
     "named 'shop.nosuch')"),
    ("application.schedules", "shop.schedules:NIGHTLY",
     f"{P}.schedules: PCELERY_SCHEDULES='shop.schedules:NIGHTLY' cannot be loaded (AttributeError: module "
     "'shop.schedules' has no attribute 'NIGHTLY')"),
    ("application.schedules", "shop.queues:CATALOG",
     f"{P}.schedules: PCELERY_SCHEDULES='shop.queues:CATALOG' must be a list of pcelery.scheduler.Schedule; synth "
     "imports it as the scheduler would, with application.python_path"),
    ("scheduler.tasks", 0, f"{E}.scheduler.tasks: 0 is not valid: 1 to 4 scheduler tasks"),
    ("scheduler.tasks", 5, f"{E}.scheduler.tasks: 5 is not valid: 1 to 4 scheduler tasks"),
    ("scheduler.tasks", "2", f"{E}.scheduler.tasks: '2' is a str, expected int"),
    ("scheduler.tasks", True, f"{E}.scheduler.tasks: True is a bool, expected int"),
    ("scheduler.tasks", KeyError, f"{E}.scheduler.tasks: missing: set it (int, 1 to 4 scheduler tasks"),
    ("scheduler", 2, f'{E}.scheduler: missing or not an object: give {{"tasks": 2}}: how many scheduler tasks run'),
    ("scheduler", {"tasks": 2, "cpu": 256}, f"{E}.scheduler.cpu: unknown key (known: tasks): remove or rename it"),
])
def test_bad_schedules_or_scheduler_value_names_the_key_and_the_fix(path, value, expected):
    with pytest.raises(ConfigError) as err:
        parse("prod", context_with("prod", path, value))
    assert expected in str(err.value)


def test_a_scheduler_block_without_schedules_is_refused():
    """It would deploy nothing: the count of a scheduler that does not exist is a mistake to name."""
    ctx = context_with("prod", "application.schedules", KeyError)
    with pytest.raises(ConfigError) as err:
        parse("prod", ctx)
    assert (f"{E}.scheduler: is set, but application.schedules is not, so no scheduler runs: remove the block, or "
            "name your schedules in application.schedules") in str(err.value)
    del ctx[CONTEXT_KEY]["prod"]["scheduler"]
    prod = parse("prod", ctx)
    assert prod.application.schedules_spec is None and prod.application.schedules == ()


def _schedules_in(tmp_path, module: str, source: str) -> dict:
    """prod's context with schedules from a module of the test's own, imported from tmp_path (and
    the product's catalog: default and long)."""
    (tmp_path / f"{module}.py").write_text(source)
    ctx = context_with("prod", "application.python_path", ["."])
    application = ctx[CONTEXT_KEY]["prod"]["application"]
    del application["catalog"]
    application["schedules"] = f"{module}:SCHEDULES"
    return ctx


def test_schedules_of_the_teams_own_module_load_with_their_queues(tmp_path):
    ctx = _schedules_in(tmp_path, "pcelery_test_good_schedules", (
        "from pcelery.scheduler import Schedule\n"
        "SCHEDULES = [Schedule(name='sync', task='shop.tasks.sync', every=300),\n"
        "             Schedule(name='report', task='shop.tasks.report', cron='0 6 * * 1', queue='long')]\n"
    ))
    prod = parse("prod", ctx, base_dir=tmp_path)
    assert [(s.name, s.queue) for s in prod.application.schedules] == [("sync", None), ("report", "long")]
    assert prod.application.schedules_spec == "pcelery_test_good_schedules:SCHEDULES"


@pytest.mark.parametrize("module, source, expected", [
    # A schedule that cannot run fails where it is built: at import, here at synth.
    ("pcelery_test_bad_cron", "from pcelery.scheduler import Schedule\n"
     "SCHEDULES = [Schedule(name='nightly', task='shop.tasks.report', cron='61 * * * *')]\n",
     "schedule 'nightly': cron='61 * * * *' is not a five-field cron expression, e.g. '30 2 * * *'"),
    ("pcelery_test_bad_zone", "from pcelery.scheduler import Schedule\n"
     "SCHEDULES = [Schedule(name='nightly', task='shop.tasks.report', cron='0 2 * * *', timezone='Paris')]\n",
     "schedule 'nightly': timezone='Paris' is not an IANA time zone"),
    ("pcelery_test_twice", "from pcelery.scheduler import Schedule\n"
     "SCHEDULES = [Schedule(name='sync', task='a.b', every=60), Schedule(name='sync', task='a.c', every=60)]\n",
     "PCELERY_SCHEDULES='pcelery_test_twice:SCHEDULES': schedule names ['sync'] are used twice; names must be unique"),
    ("pcelery_test_raising_schedules", "raise RuntimeError('settings not configured')\n",
     "PCELERY_SCHEDULES='pcelery_test_raising_schedules:SCHEDULES' cannot be loaded (RuntimeError: settings not "
     "configured)"),
    ("pcelery_test_no_schedules", "SCHEDULES = []\n",
     "'pcelery_test_no_schedules:SCHEDULES' is an empty list: add a Schedule, or leave schedules out (no scheduler "
     "service is then deployed)"),
    ("pcelery_test_unknown_queue", "from pcelery.scheduler import Schedule\n"
     "SCHEDULES = [Schedule(name='sync', task='a.b', every=60, queue='reports')]\n",
     "schedule 'sync' sends to queue 'reports', which the catalog lacks: use one of default, long "
     "(application.catalog), or leave queue out for the task's declared queue"),
])
def test_schedules_that_cannot_run_fail_synth_naming_the_key(tmp_path, module, source, expected):
    ctx = _schedules_in(tmp_path, module, source)
    with pytest.raises(ConfigError) as err:
        parse("prod", ctx, base_dir=tmp_path)
    assert f"{P}.schedules: {expected}" in str(err.value)
    assert sys.path == [p for p in sys.path if p != str(tmp_path.resolve())]  # taken off again
