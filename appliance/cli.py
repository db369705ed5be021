"""`tokenspeed up | down | status | top | bench | kernels`: every subcommand takes -c and --set, so
they all find the daemon that `up` started with the same config (its Unix socket and pid file)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from appliance.config import AppConfig, ConfigError, cache_dir, load_config

if TYPE_CHECKING:
    from appliance.server.serve import Listening

log = logging.getLogger("tokenspeed")


# The daemon's own loggers: `up` logs them at INFO; libraries (uvicorn, httpx, ...) only warn
# unless -v. The other commands print their own output and nothing else unless -v.
OWN_LOGGERS = ("tokenspeed", "appliance")
RANK_LOG_LEVEL_ENV = "TOKENSPEED_RANK_LOG_LEVEL"  # read by engine ranks (spawned processes)


def main(argv: list[str] | None = None) -> int:
    _open_missing_std_fds()
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(args.command, args.verbose)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"tokenspeed: config error: {e}", file=sys.stderr)
        return 2
    return args.handler(config, args)


def _open_missing_std_fds() -> None:
    """/dev/null on descriptors 0-2 that whoever started us closed (some supervisors do): else
    the next files opened take them (QA: the pid file became stdout and the listening socket
    stderr, which the engine ranks then inherited and held open)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="YAML config (default: configs/default.yaml)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set server.port=9000 (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also log what the libraries and engine ranks do (INFO)")
    parser = argparse.ArgumentParser(prog="tokenspeed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in [
        ("up", cmd_up, "start the daemon in the foreground (Ctrl-C / SIGTERM / SIGHUP drain and exit)"),
        ("down", cmd_down, "stop the daemon started with the same config"),
        ("status", cmd_status, "print the daemon's health and KV/queue figures"),
        ("top", cmd_top, "live dashboard of the daemon"),
    ]:
        sub.add_parser(name, parents=[common], help=help_text).set_defaults(handler=handler)
    bench = sub.add_parser("bench", parents=[common], help="benchmark the running daemon")
    from appliance.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(handler=cmd_bench)
    kern = sub.add_parser("kernels", parents=[common],
                          help="list every kernel implementation (and why one is unavailable) or explain a choice")
    kern.add_argument("--explain", metavar="OP", help="explain which implementation OP selects")
    kern.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    kern.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    kern.set_defaults(handler=cmd_kernels)
    return parser


def configure_logging(command: str, verbose: bool) -> None:
    """`top` logs into Textual's log (never over the screen); `up` logs the daemon's own
    loggers; every command logs libraries (httpx's per-request INFO lines...) only with -v."""
    level = logging.INFO if verbose else logging.WARNING
    if command == "top":
        from textual.logging import TextualHandler

        logging.basicConfig(level=level, handlers=[TextualHandler()])
        return
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "up":
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        os.environ[RANK_LOG_LEVEL_ENV] = logging.getLevelName(level)


def cmd_up(config: AppConfig, args: argparse.Namespace) -> int:
    from appliance.daemon_lock import DaemonLock, DaemonRunning

    clash = kernels_name_clash()
    if clash:
        print(f"tokenspeed: {clash}", file=sys.stderr)
        return 1
    os.umask(0o077)  # sockets, pid file and folders are private whatever the caller's umask
    try:
        _make_run_dir(config)
        lock = DaemonLock.acquire(config.pid_file)
    except DaemonRunning as e:
        print(f"tokenspeed: a daemon (pid {e.pid}) already runs for {config.server.socket}; stop it "
              "with `tokenspeed down` (same -c/--set)", file=sys.stderr)
        return 1
    except OSError as e:  # the operator's setting, as for the cache's other failures
        print(f"tokenspeed: config error: {_run_dir_setting(config)}: cannot use the run folder "
              f"{config.run_dir}: {e}", file=sys.stderr)
        return 2
    lock.keep()
    try:
        return _run_daemon(config)
    finally:
        lock.release()


def kernels_name_clash() -> str | None:
    """Hugging Face's `kernels` distribution installs a top-level `kernels` package, the import
    name of TokenSpeed's own; with both present, transformers (5.25+ requires it) imports ours
    and fails deep inside a tokenizer load. Say so before anything starts."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("kernels")
    except PackageNotFoundError:
        return None
    return (f"the `kernels` distribution {found} (Hugging Face hub kernels) is installed; its import "
            "name clashes with TokenSpeed's `kernels` package. Remove it (`pip uninstall kernels`) "
            "and keep transformers below 5.25, as pyproject.toml asks")


def _run_daemon(config: AppConfig) -> int:
    """Everything `up` does once it holds the daemon lock."""
    from appliance.server.fd_limit import raise_fd_limit
    from appliance.server.serve import listen

    before, after = raise_fd_limit()   # before the ranks start: they inherit it
    if after != before:
        log.info("open-file limit raised from %d to %d", before, after)
    # Bound before anything loads: a port in use fails at once, and /health answers meanwhile.
    try:
        listening = listen(config)
    except OSError as e:
        print(f"tokenspeed: {e}", file=sys.stderr)
        return 1
    try:
        return _serve_when_ready(config, listening)
    finally:
        listening.close()  # serve() closed it already, unless start-up ended early


def _serve_when_ready(config: AppConfig, listening: Listening) -> int:
    """Start the engine while /health says "warming up", then serve."""
    from rich.console import Console

    from appliance.engine.client import EngineClient, EngineStartError
    from appliance.engine.model_files import check_mtp_checkpoint, resolve_model_files
    from appliance.engine.sampling_defaults import read_sampling_defaults
    from appliance.server.serve import serve, stop_signals
    from appliance.server.warming_up import WarmingUp
    from appliance.startup_progress import StartupProgress, since_process_start

    try:
        _check_run_dir(config)
        files = resolve_model_files(config)
        check_mtp_checkpoint(config, files)
        sampling_defaults = read_sampling_defaults(files, config.model.sampling_defaults)
    except ConfigError as e:
        print(f"tokenspeed: config error: {e}", file=sys.stderr)
        return 2
    # Ctrl-C while the model loads: stop the ranks and exit cleanly too.
    stopping = [s for s in stop_signals() if s != signal.SIGINT]  # SIGINT: KeyboardInterrupt
    for sig in stopping:
        signal.signal(sig, _raise_keyboard_interrupt)
    client = None
    # The tokenizer loads (seconds: transformers' import) while the engine ranks start, then
    # the app's modules (serve() imports them late: appliance/server/__init__.py).
    from appliance.frontend_tokenizer import load_tokenizer

    loader = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
    tokenizer = loader.submit(load_tokenizer, files.tokenizer)
    loader.submit(importlib.import_module, "appliance.server.app")
    loader.shutdown(wait=False)
    try:
        log.info("starting %d engine rank(s) for %s", config.parallel.tp_size, config.model.model_name)
        with WarmingUp(listening.sockets), StartupProgress(Console(stderr=True)) as progress:
            client = EngineClient(config, files, on_progress=progress.on_stage)
            ready_tokenizer = tokenizer.result()
        log.info("engine ready: %d KV pages of %d tokens, max_model_len %d (%s)",
                 client.info.num_pages, client.info.page_size, client.max_model_len,
                 since_process_start())
        _warn_tokenizer_past_vocabulary(len(ready_tokenizer), client.info.vocab_size, files.tokenizer)
        for sig in stopping:
            signal.signal(sig, signal.SIG_DFL)
        if changed := sampling_defaults.changed():
            log.info("sampling defaults from the model's generation_config.json (for the fields a "
                     "request leaves out): %s", ", ".join(f"{k} {v:g}" for k, v in changed.items()))
        return serve(config, client, ready_tokenizer, listening, sampling_defaults)
    except ConfigError as e:
        print(f"tokenspeed: config error: {e}", file=sys.stderr)
        return 2
    except EngineStartError as e:
        print(f"tokenspeed: the engine failed to start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if client is not None:
            client.close()


def cmd_down(config: AppConfig, args: argparse.Namespace) -> int:
    from appliance.daemon_lock import is_daemon_process, lock_holder, read_pid

    path = config.pid_file
    pid, holder = read_pid(path), lock_holder(path)
    if holder is None:
        print(f"tokenspeed: no daemon running for {config.server.socket}", file=sys.stderr)
        return 1
    if pid != holder or not is_daemon_process(pid):
        print(f"tokenspeed: {path} names pid {pid}, but the process holding it (pid {holder}) is not "
              "that tokenspeed daemon; not signalling anything", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if lock_holder(path) != pid:
            print(f"tokenspeed: daemon {pid} stopped")
            return 0
        time.sleep(0.2)
    print(f"tokenspeed: daemon {pid} still running after 60 s", file=sys.stderr)
    return 1


def cmd_status(config: AppConfig, args: argparse.Namespace) -> int:
    import httpx

    try:
        with _socket_client(config) as http:
            engine = http.get("/health").json().get("status", "unknown")
            stats = http.get("/stats").json()
    except (httpx.HTTPError, OSError, ValueError) as e:
        print(f"tokenspeed: no daemon answers on {config.server.socket} ({e})", file=sys.stderr)
        return 1
    stats.pop("history", None)  # the dashboard's sparklines: not a status figure
    print(json.dumps({"health": engine == "ok", "engine": engine, "socket": config.server.socket,
                      "http": f"http://{config.server.host}:{config.server.port}", **stats}, indent=2))
    return 0 if engine == "ok" else 1


def cmd_top(config: AppConfig, args: argparse.Namespace) -> int:
    from appliance.tui import run_top

    return run_top(config)


def cmd_bench(config: AppConfig, args: argparse.Namespace) -> int:
    from appliance.bench import run_bench

    return run_bench(config, args)


def cmd_kernels(config: AppConfig, args: argparse.Namespace) -> int:
    """Without --explain: every op's implementations, best first, and each backend that is
    unavailable here with the reason; with --explain OP: why OP selects what it selects."""
    import torch

    import kernels

    kernels.set_overrides(dict(config.kernels.override))
    if args.explain:
        try:
            print(kernels.explain(args.explain, device=args.device, dtype=getattr(torch, args.dtype)))
        except kernels.KernelError as e:  # an unknown op: the message lists the known ones
            print(f"tokenspeed kernels: {e}", file=sys.stderr)
            return 2
        return 0
    print(kernels.listing())
    return 0


def _socket_client(config: AppConfig):
    import httpx

    headers = {"Authorization": f"Bearer {config.server.api_key}"} if config.server.api_key else {}
    return httpx.Client(transport=httpx.HTTPTransport(uds=config.server.socket),
                        base_url="http://tokenspeed", headers=headers, timeout=5.0)


def _check_run_dir(config: AppConfig) -> None:
    """The run folder leaves room for the engine channel's ipc paths; checked before anything
    loads, naming the setting that chose the folder."""
    from appliance.engine.channel import ChannelError, check_run_dir_length

    try:
        check_run_dir_length(config.run_dir, _run_dir_setting(config))
    except ChannelError as e:
        raise ConfigError(str(e)) from None


def _run_dir_setting(config: AppConfig) -> str:
    """What chose the run folder: the cache (TOKENSPEED_CACHE) or server.socket's folder."""
    return "TOKENSPEED_CACHE" if config.run_dir == cache_dir() / "run" else "server.socket"


def _make_run_dir(config: AppConfig) -> None:
    """The run folder, 0700 when we create it. The default one (under the cache) is made 0700
    even if it exists; a folder named through server.socket keeps its mode (it may be /tmp)."""
    run_dir = config.run_dir
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if created or run_dir == cache_dir() / "run":
        os.chmod(run_dir, 0o700)


def _warn_tokenizer_past_vocabulary(tokenizer_ids: int, vocab_size: int, folder: str) -> None:
    """A tokenizer with ids past the model's vocabulary (another model's?) makes every prompt
    holding one a 400: say so once, at start-up, where the operator looks."""
    if tokenizer_ids > vocab_size:
        log.warning("the tokenizer in %s has %d ids, the model's vocab_size is %d: prompts "
                    "holding ids %d and above will be refused (are they of the same model?)",
                    folder, tokenizer_ids, vocab_size, vocab_size)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
