"""AWS sessions for ops, and the mapping of botocore failures to OpsError exit codes.

`connect` builds the boto3 session and the SQS client a command uses (through the product's one
SQS client factory, make_client of pcelery.sqs); `aws_error` turns a botocore failure into one
actionable line with its exit code; `call` runs one SQS call under that mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pcelery.ops import EXIT_AUTH, EXIT_NOT_FOUND, EXIT_UNREACHABLE, OpsError
from pcelery.settings import Settings

# boto3 builds its clients at run time and the lock has no stubs for them: an SQS or CloudWatch
# client is Any to mypy. The aliases say which one a parameter expects.
SqsClient = Any
CloudWatchClient = Any


@dataclass
class Aws:
    """The boto3 session and clients a command uses, built from the standard AWS settings."""

    session: Any  # boto3.Session (untyped: see SqsClient)
    sqs: SqsClient
    endpoint: str | None
    region: str

    @property
    def local(self) -> bool:
        # A custom endpoint is moto or LocalStack: no CloudWatch metrics exist there.
        return self.endpoint is not None

    def cloudwatch(self) -> CloudWatchClient:
        return self.session.client("cloudwatch", region_name=self.region, config=_config())


def _config() -> Any:
    """CloudWatch gets the SQS clients' ops patience, from the same numbers (pcelery.sqs)."""
    from botocore.config import Config

    from pcelery.sqs import OPS, sqs_timeouts

    return Config(**sqs_timeouts(OPS))


def connect(settings: Settings, *, profile: str | None = None, region: str | None = None,
            endpoint_url: str | None = None) -> Aws:
    """Clients for a command: --profile/--region/--endpoint-url, else the standard AWS settings.
    An endpoint (a local emulator) without credentials gets the emulators' dummy keys."""
    import boto3
    import botocore.exceptions

    from pcelery.settings import DEFAULT_REGION
    from pcelery.sqs import OPS, make_client

    endpoint = endpoint_url or settings.sqs_endpoint
    try:
        session = boto3.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound as exc:
        raise OpsError(f"{exc}: check --profile / AWS_PROFILE (aws configure list-profiles)", EXIT_AUTH) from None
    region = region or settings.aws_region or session.region_name
    if not region:
        if endpoint:
            region = DEFAULT_REGION
        else:
            raise OpsError("no AWS region configured: pass --region or set AWS_REGION", EXIT_AUTH)
    sqs = make_client(settings, endpoint_url=endpoint, region=region, timeouts=OPS, session=session)
    return Aws(session=session, sqs=sqs, endpoint=endpoint, region=region)


def error_code(exc: Exception) -> str:
    """The AWS error code of a ClientError ("" for anything else)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def http_status(exc: Exception) -> int | None:
    """The HTTP status of a ClientError (None for anything else)."""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None if status is None else int(status)


def aws_error(exc: Exception, what: str) -> OpsError:
    """The one-line, actionable form of a botocore failure while doing `what`."""
    import botocore.exceptions as bx

    if isinstance(exc, OpsError):
        return exc
    if isinstance(exc, (bx.SSOError, bx.TokenRetrievalError, bx.CredentialRetrievalError)):
        return OpsError(f"{what}: the AWS session cannot be used ({exc}): run `aws sso login` for the profile "
                        "and retry", EXIT_AUTH)
    if isinstance(exc, bx.NoRegionError):
        return OpsError(f"{what}: no AWS region configured: pass --region or set AWS_REGION", EXIT_AUTH)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return OpsError(f"{what}: no AWS credentials found: run `aws sso login --profile <profile>` and pass "
                        "--profile (or set AWS_PROFILE), or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                        EXIT_AUTH)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return OpsError(f"{what}: cannot reach the SQS endpoint ({exc}): check --endpoint-url / "
                        "AWS_ENDPOINT_URL_SQS, the network or VPN, and --region (for the local stack: "
                        "`python -m ops local status`)", EXIT_UNREACHABLE)
    if isinstance(exc, bx.ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
            return OpsError(f"{what}: queue not found: check the name, --env and --region "
                            "(`python -m ops depth --env <env>` lists the catalog queues)", EXIT_NOT_FOUND)
        if code in ("AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId",
                    "ExpiredToken", "ExpiredTokenException", "InvalidSecurityToken",
                    "SignatureDoesNotMatch", "AuthFailure"):
            return OpsError(f"{what}: AWS refused the credentials ({code}: {message}): refresh them "
                            "(`aws sso login`) or use a role allowed to do this", EXIT_AUTH)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if not code or code.isdigit():  # botocore found no AWS error in the answer: a proxy's or web page
            page = " ".join(message.split())
            return OpsError(f"{what}: the endpoint answered HTTP {status} without an SQS error "
                            f"({page[:120] + ('…' if len(page) > 120 else '')}): SQS or the network in between is "
                            "failing; retry, and if it persists check --endpoint-url / AWS_ENDPOINT_URL_SQS",
                            EXIT_UNREACHABLE)
        return OpsError(f"{what}: AWS error {code}: {message}", EXIT_UNREACHABLE)
    if isinstance(exc, bx.BotoCoreError):
        return OpsError(f"{what}: {exc}", EXIT_UNREACHABLE)
    raise exc


def call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """fn(**kwargs), with a botocore failure raised as the OpsError of `aws_error`."""
    import botocore.exceptions as bx

    try:
        return fn(**kwargs)
    except (bx.BotoCoreError, bx.ClientError) as exc:
        raise aws_error(exc, what) from None
