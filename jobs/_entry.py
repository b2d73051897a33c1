"""What every job entry point shares: read the config (a file, or JSON passed inline by
`vaepipe submit` so nothing assumes a disk shared with the submitter), apply --set overrides,
run one pipeline function, print its JSON result line, and always shut Ray down."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from pipelines.config import apply_overrides, load_config_file


def parse_config(prog: str, argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=prog, description=f"Cluster entry point: {prog}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config file")
    source.add_argument("--config-json", help="the config as one JSON object (what `vaepipe submit` sends)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    data = load_config_file(args.config) if args.config else json.loads(args.config_json)
    return apply_overrides(data, args.assignments)


def run_job(prog: str, argv: list[str] | None, pipeline: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    try:
        result = pipeline(parse_config(prog, argv))
        print(json.dumps(result, sort_keys=True, default=str), flush=True)
        return 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # bad config or input: one clear line, like the CLI
        print(f"{prog}: error: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `ray job stop` or Ctrl-C: the work done so far resumes on the next run
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
