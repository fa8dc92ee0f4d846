"""The application image of one environment: the team's image, built from a directory or pulled by URI.

One image serves every container of the environment: the workers (`pcelery-worker`), the outbox
relay, the migrate init containers, the migrate task and the ops task, which run persistent-celery's
console scripts inside it. That is why it must be the team's image with persistent-celery installed,
not the product's own: the relay and ops load the team's catalog module (PCELERY_CATALOG), which
only the team's image holds, and a single image keeps the application and the product in lockstep (a
worker and the relay never run different releases).
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from constructs import Construct

from .config import ImageConfig


def application_image(scope: Construct, *, image: ImageConfig) -> ecs.ContainerImage:
    """The ContainerImage `image` describes; each container that uses it gets the pull granted."""
    if image.ecr is not None:
        # An imported repository rather than from_registry, so CDK grants every execution role
        # the pull on exactly this repository (ecr:BatchGetImage and friends on its ARN). A
        # repository of another account must also allow this account in its repository policy.
        repository = ecr.Repository.from_repository_attributes(
            scope, "ApplicationRepository",
            repository_arn=image.ecr.repository_arn, repository_name=image.ecr.repository,
        )
        return ecs.ContainerImage.from_ecr_repository(repository, image.ecr.tag_or_digest)
    if image.uri is not None:
        # Any other registry: public images only; ECS pulls them without credentials.
        return ecs.ContainerImage.from_registry(image.uri)
    # Built by Docker at deploy time and pushed to the CDK asset repository (which CDK grants the
    # pull on). The asset copies the build context into cdk.out on every synth, filtered by its
    # .dockerignore, so an infra-only change builds no new image. Fargate runs x86_64 here.
    return ecs.ContainerImage.from_asset(
        str(image.directory),
        file=image.file,
        build_args=dict(image.build_args) or None,
        platform=ecr_assets.Platform.LINUX_AMD64,
        ignore_mode=cdk.IgnoreMode.DOCKER,
    )
