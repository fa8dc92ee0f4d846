#!/usr/bin/env python3
"""CDK entry point: `npx cdk synth` (every environment) or `npx cdk synth -c env=prod`.

The CLI passes cdk.json's context in; `python app.py` alone does not read cdk.json.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import aws_cdk as cdk

from infra.config import ConfigError, load_configs
from infra.nag import add_checks
from infra.stacks import build_app

# cdk.json's directory: the application's image directory and python_path are relative to it.
BASE_DIR = Path(__file__).resolve().parent


def main() -> None:
    app = cdk.App()
    try:
        configs = load_configs(app.node.try_get_context, base_dir=BASE_DIR)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    build_app(app, configs)
    add_checks(app)
    app.synth()


if __name__ == "__main__":
    main()
