"""Command line: ``python -m orthanc_plugin worker --settings FILE`` (and more sub-commands)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orthanc_plugin")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run an AI worker process")
    w.add_argument("--settings", required=True, help="JSON file with an OrthancAI section")
    w.add_argument("--owner", default=None, help="lease owner name (default host:pid)")
    w.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    c = sub.add_parser("check-config", help="validate a pipelines file and exit")
    c.add_argument("pipelines_file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "worker":
        from .worker import main as worker_main

        return worker_main(args.settings, args.owner, args.parent_pid)
    if args.command == "check-config":
        from pathlib import Path

        from .config import ConfigError, load_pipelines

        try:
            pipelines = load_pipelines(Path(args.pipelines_file))
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        print(
            f"{args.pipelines_file}: {len(pipelines)} pipeline(s) OK: {', '.join(p.name for p in pipelines)}"
        )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
