"""Command line: ``python -m orthanc_plugin worker --settings FILE`` (and more sub-commands).

``viewer --orthanc URL --dist DIR --config FILE --origin https://pacs.example`` serves the OHIF viewer
and DICOMweb on one origin, see :mod:`orthanc_plugin.viewer.gateway`.

``worker --orthanc-url URL --triton-url HOST:PORT --database-url postgresql://... --pipelines FILE``
runs workers on a host without Orthanc (scale-out), see :mod:`orthanc_plugin.worker.remote`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orthanc_plugin")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run an AI worker process")
    w.add_argument(
        "--settings", default=None, help="JSON file with an OrthancAI section (Orthanc's own workers)"
    )
    w.add_argument("--owner", default=None, help="lease owner name (default host:pid)")
    w.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    from orthanc_plugin.worker.remote import add_arguments as add_remote_worker_arguments

    add_remote_worker_arguments(w)
    c = sub.add_parser("check-config", help="validate a pipelines file and exit")
    c.add_argument("pipelines_file")
    m = sub.add_parser("model", help="bring your own model: add an ONNX file to the Triton repository")
    msub = m.add_subparsers(dest="model_command", required=True)
    ma = msub.add_parser("add", help="copy an ONNX model into the repository, write config.pbtxt and a stub")
    ma.add_argument("onnx", help="the ONNX file")
    ma.add_argument("--name", required=True, help="Triton model name (folder in the repository)")
    ma.add_argument("--repository", default="triton_models", help="model repository (default triton_models)")
    ma.add_argument("--pipeline", default=None, help="pipeline name for the stub (default from --name)")
    ma.add_argument("--max-batch-size", type=int, default=4, help="0: no batching (default 4)")
    ma.add_argument("--version", type=int, default=None, help="version number (default: the next free)")
    ma.add_argument("--force", action="store_true", help="replace a version / rewrite a differing config")
    ma.add_argument(
        "--write-stub",
        nargs="?",
        const="config/pipelines.d",
        default=None,
        metavar="DIR",
        help="also write the stub to DIR/<pipeline>.yaml.example (default DIR config/pipelines.d)",
    )
    ml = msub.add_parser("list", help="models in the repository, their versions and inputs/outputs")
    ml.add_argument("--repository", default="triton_models", help="model repository (default triton_models)")
    v = sub.add_parser("viewer", help="serve OHIF and Orthanc's DICOMweb on one origin (the viewer gateway)")
    v.add_argument("--orthanc", required=True, help="Orthanc's HTTP root, e.g. http://orthanc:8042")
    v.add_argument(
        "--listen", default="127.0.0.1:3000", help="HOST:PORT to listen on (default 127.0.0.1:3000)"
    )
    v.add_argument("--dist", required=True, help="OHIF's prebuilt dist/ folder (the image: /opt/ohif/dist)")
    v.add_argument("--config", required=True, help="the app-config.js to serve (viewer/app-config.js)")
    v.add_argument(
        "--origin",
        action="append",
        default=[],
        help="origin whose pages may store a corrected segmentation (STOW-RS), e.g. https://pacs.example;"
        " repeat or separate by commas; none: nothing is stored through the gateway",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "worker":
        from orthanc_plugin.core.logs import setup_worker_logging
        from orthanc_plugin.worker.loop import main as worker_main

        setup_worker_logging()  # JSON lines (replaces the plain format set above)

        from orthanc_plugin.worker.remote import run as run_remote_workers
        from orthanc_plugin.worker.remote import uses_command_line

        if uses_command_line(args):  # a worker host: Orthanc, Triton and the database by flags
            return run_remote_workers(args)
        if args.settings is None:
            parser.error(
                "worker: give --settings FILE, or --orthanc-url, --triton-url, --database-url and --pipelines"
            )
        if args.parent_pid is None:  # a worker host reading the Orthancs' configuration file
            return run_remote_workers(args, from_file=True)
        return worker_main(args.settings, args.owner, args.parent_pid)  # started by Orthanc's plugin
    if args.command == "viewer":
        from pathlib import Path

        from orthanc_plugin.viewer.gateway import ViewerError, parse_listen, parse_origins, serve

        try:
            host, port = parse_listen(args.listen)
            origins = parse_origins(args.origin)
            serve(args.orthanc, host, port, Path(args.dist).resolve(), Path(args.config).resolve(), origins)
        except (ValueError, ViewerError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "check-config":
        from pathlib import Path

        from orthanc_plugin.core.config import ConfigError, load_pipelines

        try:
            pipelines = load_pipelines(Path(args.pipelines_file))
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        print(
            f"{args.pipelines_file}: {len(pipelines)} pipeline(s) OK: {', '.join(p.name for p in pipelines)}"
        )
        return 0
    if args.command == "model":
        return _model(args)
    return 2


def _model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orthanc_plugin.models.cli import ModelCliError, add_model, format_models, list_models

    try:
        if args.model_command == "list":
            print(format_models(list_models(Path(args.repository))))
            return 0
        added = add_model(
            Path(args.onnx),
            args.name,
            repository=Path(args.repository),
            pipeline=args.pipeline,
            max_batch_size=args.max_batch_size,
            version=args.version,
            force=args.force,
            stub_dir=Path(args.write_stub) if args.write_stub is not None else None,
        )
    except ModelCliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in added.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(added.stub)
    print(
        f"# added {added.model_file} (model '{added.name}' version {added.version}); "
        + (f"wrote {added.config_file}" if added.config_written else f"kept {added.config_file}"),
        file=sys.stderr,
    )
    if added.stub_file is not None:
        print(f"# pipeline stub written to {added.stub_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
