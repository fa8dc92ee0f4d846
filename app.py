#!/usr/bin/env python3
"""CDK entry point: `npx cdk synth` (every environment) or `npx cdk synth -c env=prod`.

The CLI passes cdk.json's context in; `python app.py` alone does not read cdk.json.
"""

import os
import sys

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import aws_cdk as cdk

from infra.config import ConfigError, load_configs
from infra.nag import add_checks
from infra.stacks import build_app


def main() -> None:
    app = cdk.App()
    try:
        configs = load_configs(app.node.try_get_context)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    build_app(app, configs)
    add_checks(app)
    app.synth()


if __name__ == "__main__":
    main()
