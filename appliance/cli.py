"""`tokenspeed up | down | status | top | bench | kernels`: every subcommand takes -c and --set, so
they all find the daemon that `up` started with the same config (its Unix socket and pid file)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from appliance.config import AppConfig, ConfigError, load_config

log = logging.getLogger("tokenspeed")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"tokenspeed: config error: {e}", file=sys.stderr)
        return 2
    return args.handler(config, args)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="YAML config (default: configs/default.yaml)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set server.port=9000 (repeatable)")
    parser = argparse.ArgumentParser(prog="tokenspeed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in [
        ("up", cmd_up, "start the daemon in the foreground (Ctrl-C / SIGTERM drains and exits)"),
        ("down", cmd_down, "stop the daemon started with the same config"),
        ("status", cmd_status, "print the daemon's health and KV/queue figures"),
        ("top", cmd_top, "live dashboard of the daemon"),
    ]:
        sub.add_parser(name, parents=[common], help=help_text).set_defaults(handler=handler)
    bench = sub.add_parser("bench", parents=[common], help="benchmark the running daemon")
    from appliance.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(handler=cmd_bench)
    kern = sub.add_parser("kernels", parents=[common], help="list kernel backends or explain a choice")
    kern.add_argument("--explain", metavar="OP", help="explain which implementation OP selects")
    kern.add_argument("--device", default="cuda")
    kern.add_argument("--dtype", default="bfloat16")
    kern.set_defaults(handler=cmd_kernels)
    return parser


def pid_file(config: AppConfig) -> Path:
    return Path(config.server.socket + ".pid")


def cmd_up(config: AppConfig, args: argparse.Namespace) -> int:
    from appliance.engine.client import EngineClient, EngineStartError
    from appliance.engine.model_files import resolve_model_files

    if _daemon_answers(config):
        print(f"tokenspeed: a daemon already answers on {config.server.socket}", file=sys.stderr)
        return 1
    try:
        files = resolve_model_files(config)
    except ConfigError as e:
        print(f"tokenspeed: config error: {e}", file=sys.stderr)
        return 2
    tokenizer = _load_tokenizer(files.tokenizer)
    # Ctrl-C while the model loads: stop the ranks and exit cleanly too.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    client = None
    try:
        log.info("starting %d engine rank(s) for %s", config.parallel.tp_size, config.model.model_name)
        client = EngineClient(config, files)
        log.info("engine ready: %d KV pages of %d tokens, max_model_len %d",
                 client.info.num_pages, client.info.page_size, client.max_model_len)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from appliance.server.serve import serve

        pid_file(config).parent.mkdir(parents=True, exist_ok=True)
        pid_file(config).write_text(str(os.getpid()))
        return serve(config, client, tokenizer)
    except EngineStartError as e:
        print(f"tokenspeed: the engine failed to start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if client is not None:
            client.close()
        pid_file(config).unlink(missing_ok=True)


def cmd_down(config: AppConfig, args: argparse.Namespace) -> int:
    path = pid_file(config)
    try:
        pid = int(path.read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        print(f"tokenspeed: no daemon running for {config.server.socket}", file=sys.stderr)
        path.unlink(missing_ok=True)
        return 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"tokenspeed: daemon {pid} stopped")
            return 0
        time.sleep(0.2)
    print(f"tokenspeed: daemon {pid} still running after 60 s", file=sys.stderr)
    return 1


def cmd_status(config: AppConfig, args: argparse.Namespace) -> int:
    import httpx

    try:
        with _socket_client(config) as http:
            health = http.get("/health")
            stats = http.get("/stats").json()
    except (httpx.HTTPError, OSError) as e:
        print(f"tokenspeed: no daemon answers on {config.server.socket} ({e})", file=sys.stderr)
        return 1
    print(json.dumps({"health": health.status_code == 200, "socket": config.server.socket,
                      "http": f"http://{config.server.host}:{config.server.port}", **stats}, indent=2))
    return 0 if health.status_code == 200 else 1


def cmd_top(config: AppConfig, args: argparse.Namespace) -> int:
    from appliance.tui import run_top

    return run_top(config)


def cmd_bench(config: AppConfig, args: argparse.Namespace) -> int:
    from appliance.bench import run_bench

    return run_bench(config, args)


def cmd_kernels(config: AppConfig, args: argparse.Namespace) -> int:
    import torch

    import kernels

    kernels.set_overrides(dict(config.kernels.override))
    dtype = getattr(torch, args.dtype)
    ops = [args.explain] if args.explain else kernels.registered_ops()
    for op in ops:
        print(kernels.explain(op, device=args.device, dtype=dtype))
    return 0


def _socket_client(config: AppConfig):
    import httpx

    headers = {"Authorization": f"Bearer {config.server.api_key}"} if config.server.api_key else {}
    return httpx.Client(transport=httpx.HTTPTransport(uds=config.server.socket),
                        base_url="http://tokenspeed", headers=headers, timeout=5.0)


def _daemon_answers(config: AppConfig) -> bool:
    import httpx

    if not Path(config.server.socket).exists():
        return False
    try:
        with _socket_client(config) as http:
            return http.get("/health").status_code == 200
    except (httpx.HTTPError, OSError):
        return False


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
