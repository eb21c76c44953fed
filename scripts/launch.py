"""Start splitinfer engines and HTTP servers in front of all of them; stop them all together.

Run through scripts/start_distributed.sh, which sets up .venv first. Two ways to say what to
start (see --help): flags for one engine, or a TOML file for several (models and replicas,
each engine on its own device). Engines start at once and the servers when every engine is
ready; the script then waits until Ctrl-C or SIGTERM, or until any process dies, and stops
everything it started: servers first, then the engines, which finish in-flight requests.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
READY_TIMEOUT_S = 1800.0  # a large checkpoint on a slow disk takes minutes to load
STOP_TIMEOUT_S = 10.0
MAX_RESTARTS = 5  # restarts of one engine within RESTART_WINDOW_S before the launcher gives up
RESTART_WINDOW_S = 600.0

EXAMPLE = """\
# fleet.toml: two models, one of them twice, each engine on its own GPU, two servers.
[servers]
count = 2              # servers on consecutive ports from `port`
host = "127.0.0.1"
port = 8000
# api_key = "secret"
# tool_call_parser = "auto"
# args = ["--routing", "least-loaded"]   # any other splitinfer-server flags

[[engines]]
model = "/models/llama-3.1-8b-instruct"
served_model_name = "llama"
device = "cuda:0"
# address = "tcp://127.0.0.1:5555"        # default: ipc://RUN_DIR/engine-N.sock
# args = ["--max-num-seqs", "128"]        # any other splitinfer-engine flags

[[engines]]
model = "/models/llama-3.1-8b-instruct"
served_model_name = "llama"                # the same name: a replica
device = "cuda:1"

[[engines]]
model = "/models/qwen2.5-7b-instruct"
served_model_name = "qwen"
device = "cuda:2"
"""

USAGE = f"""\
Usage: scripts/start_distributed.sh [options] [engine flags...]
       scripts/start_distributed.sh --config FLEET.toml [--run-dir DIR]

Starts engines (each loads its model once), waits until they are ready, then starts N
stateless HTTP servers on consecutive ports, each in front of every engine, prints their
URLs (the API's and the chat page's), and keeps running until Ctrl-C or SIGTERM, when it
stops everything it started and exits 0 (1 when a process failed). On a fresh clone it
first creates .venv and installs splitinfer (as scripts/test.sh does).

One engine, with flags:
  --model DIR            Hugging Face checkpoint directory. Without it, the demo model in
                         models/demo-model: a 4.2M-parameter Llama trained on Debian's fortunes
                         files (it writes English, loads in a second on CPU).
  --servers N            Number of HTTP servers (default: 1).
  --host HOST            Interface the servers listen on (default: 127.0.0.1).
  --port PORT            Port of the first server; the others count up from it (default: 8000).
  --api-key KEY          Require 'Authorization: Bearer KEY' on the servers' /v1 routes.
  --served-model-name N  Model name the engine reports and clients send (default: the
                         checkpoint's directory name).
  --tool-call-parser P   How the model writes tool calls, for the servers: auto (from the
                         checkpoint; the default), hermes, llama3_json, mistral or none.
  --engine-address ADDR  Engine socket (default: ipc://RUN_DIR/engine-0.sock).
Any other flag goes to the engine, with its value: its settings are listed below, from the
engine's own --help. Everything after `--` goes to the engine as is.

Several engines, from a TOML file:
  --config FILE          [servers] as the flags above (count, host, port, api_key,
                         tool_call_parser, web_ui, args: more server flags) and one [[engines]]
                         table per engine: model, served_model_name (engines with the same
                         name are replicas of one model), device, address, args (more engine
                         flags). For example:

{EXAMPLE}
Both:
  --run-dir DIR          Where logs and sockets go (default: runs/<date-time>).
  --no-web-ui            The servers do not serve the chat page at / (in the TOML file,
                         `web_ui = false` under [servers]).
  --no-restart           An engine that exits stops everything (default: it is started again,
                         up to 5 times in 10 minutes, while the servers keep running and
                         reconnect; in the TOML file, `restart_engines = false`). A server that
                         exits always stops everything.
  -h, --help             Show this help.

Logs: RUN_DIR/engine-N.log and RUN_DIR/server-PORT.log.
"""


@dataclass
class EngineSpec:
    model: Path
    served_model_name: str | None = None
    device: str | None = None
    address: str | None = None  # None: a socket in the run directory
    args: list[str] = field(default_factory=list)

    def command(self, address: str) -> list[str]:
        cmd = [PYTHON, "-m", "splitinfer.engine", "--model", str(self.model), "--address", address]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.device:
            cmd += ["--device", self.device]
        return cmd + self.args


@dataclass
class ServerSpec:
    count: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    tool_call_parser: str | None = None
    web_ui: bool = True  # the chat page at / of every server
    args: list[str] = field(default_factory=list)

    @property
    def serves_page(self) -> bool:
        return self.web_ui and "--no-web-ui" not in self.args

    def command(self, port: int, addresses: list[str]) -> list[str]:
        cmd = [PYTHON, "-m", "splitinfer.server", "--host", self.host, "--port", str(port)]
        for address in addresses:
            cmd += ["--engine", address]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.tool_call_parser:
            cmd += ["--tool-call-parser", self.tool_call_parser]
        if not self.web_ui:
            cmd.append("--no-web-ui")
        return cmd + self.args


@dataclass
class Fleet:
    engines: list[EngineSpec]
    servers: ServerSpec
    restart_engines: bool = True  # an engine that exits is started again; a server's exit stops all


class UsageError(Exception):
    pass


# What to start -----------------------------------------------------------------------


def fleet_from_flags(argv: list[str]) -> tuple[Fleet, str | None]:
    """What to start, from the flags (one engine) or the --config file they name: (fleet, run dir)."""
    values: dict[str, str] = {}
    engine_args: list[str] = []
    own = {
        "--model",
        "--servers",
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--tool-call-parser",
        "--engine-address",
        "--run-dir",
        "--config",
    }
    flags = {"--no-restart", "--no-web-ui"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            engine_args += argv[i + 1 :]
            break
        name, eq, inline = arg.partition("=")
        if name in flags:
            values[name] = "1"
            i += 1
        elif name in own:
            if eq:
                values[name] = inline
                i += 1
            elif i + 1 < len(argv):
                values[name] = argv[i + 1]
                i += 2
            else:
                raise UsageError(f"{name} needs a value")
        elif arg.startswith("--"):  # an engine flag: with its value unless the next word is another flag
            engine_args.append(arg)
            i += 1
            if not eq and i < len(argv) and not argv[i].startswith("--"):
                engine_args.append(argv[i])
                i += 1
        else:
            raise UsageError(f"unexpected argument {arg!r} (see --help)")
    run_dir = values.pop("--run-dir", None)
    config = values.pop("--config", None)
    restart = values.pop("--no-restart", None) is None
    web_ui = values.pop("--no-web-ui", None) is None
    if config is not None:
        if values or engine_args:
            raise UsageError(
                "--config describes everything but --run-dir, --no-restart and --no-web-ui: give no other flags"
            )
        fleet = fleet_from_toml(Path(config))
        fleet.restart_engines = fleet.restart_engines and restart
        fleet.servers.web_ui = fleet.servers.web_ui and web_ui
        return fleet, run_dir
    servers = ServerSpec(
        count=_positive(values.get("--servers", "1"), "--servers"),
        host=values.get("--host", "127.0.0.1"),
        port=_port(values.get("--port", "8000"), "--port"),
        api_key=values.get("--api-key"),
        tool_call_parser=values.get("--tool-call-parser"),
        web_ui=web_ui,
    )
    engine = EngineSpec(
        model=Path(values["--model"]) if "--model" in values else demo_model(),
        served_model_name=values.get("--served-model-name"),
        address=values.get("--engine-address"),
        args=engine_args,
    )
    return Fleet([engine], servers, restart_engines=restart), run_dir


ENGINE_KEYS = {"model", "served_model_name", "device", "address", "args"}
SERVER_KEYS = {"count", "host", "port", "api_key", "tool_call_parser", "web_ui", "args"}


def fleet_from_toml(path: Path) -> Fleet:
    try:
        import tomllib  # Python 3.11; the rest of splitinfer runs on 3.10
    except ImportError:
        raise UsageError("--config needs Python 3.11 or later (tomllib)") from None
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    unknown = set(data) - {"servers", "engines", "restart_engines"}
    if unknown:
        raise UsageError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected restart_engines, [servers] and [[engines]]"
        )
    restart = _boolean(data.get("restart_engines", True), f"{path}: 'restart_engines'")
    servers = data.get("servers", {})
    _check_keys(servers, SERVER_KEYS, f"{path} [servers]")
    engines = data.get("engines")
    if not isinstance(engines, list) or not engines:
        raise UsageError(f"{path}: give at least one [[engines]] table")
    specs = []
    for i, engine in enumerate(engines):
        where = f"{path} [[engines]] #{i + 1}"
        _check_keys(engine, ENGINE_KEYS, where)
        if not isinstance(engine.get("model"), str):
            raise UsageError(f"{where}: 'model' (the checkpoint directory) is required")
        specs.append(
            EngineSpec(
                model=(path.parent / engine["model"]).resolve()
                if not Path(engine["model"]).is_absolute()
                else Path(engine["model"]),
                served_model_name=_string(engine, "served_model_name", where),
                device=_string(engine, "device", where),
                address=_string(engine, "address", where),
                args=_strings(engine, "args", where),
            )
        )
    server_spec = ServerSpec(
        count=_positive(servers.get("count", 1), f"{path} [servers] count"),
        host=_string(servers, "host", f"{path} [servers]") or "127.0.0.1",
        port=_port(servers.get("port", 8000), f"{path} [servers] port"),
        api_key=_string(servers, "api_key", f"{path} [servers]"),
        tool_call_parser=_string(servers, "tool_call_parser", f"{path} [servers]"),
        web_ui=_boolean(servers.get("web_ui", True), f"{path} [servers] web_ui"),
        args=_strings(servers, "args", f"{path} [servers]"),
    )
    return Fleet(specs, server_spec, restart_engines=restart)


def _boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be true or false")
    return value


def _check_keys(table: object, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: expected a table")
    unknown = set(table) - allowed
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(allowed))}")


def _string(table: dict, key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{where}: '{key}' must be a string")
    return value


def _strings(table: dict, key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: '{key}' must be a list of strings (flags and their values)")
    return value


def _positive(value: object, what: str) -> int:
    return _int_within(value, 1, None, f"{what} must be a positive integer")


def _port(value: object, what: str) -> int:
    return _int_within(value, 1, 65535, f"{what} must be a port number")


def _int_within(value: object, low: int, high: int | None, message: str) -> int:
    """`value` as an int in [low, high] (no upper bound when None), or a UsageError with
    `message` and the value (a TOML boolean is no number)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number < low or (high is not None and number > high):
        raise UsageError(f"{message}, got {value!r}")
    return number


def demo_model() -> Path:
    """The demo checkpoint committed in the repository (scripts/train_demo_model.py rebuilds it)."""
    return REPO / "models" / "demo-model"


# Running it --------------------------------------------------------------------------


class Processes:
    """Everything started, in start order; `stop_all` stops them in reverse (servers first)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen, Path]] = []
        self.commands: dict[str, list[str]] = {}

    def start(self, name: str, cmd: list[str], log: Path) -> subprocess.Popen:
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.started.append((name, proc, log))
        self.commands[name] = cmd
        return proc

    def restart(self, name: str) -> subprocess.Popen:
        """Start `name` again, with its command and log, in its place in the stop order."""
        index = next(i for i, entry in enumerate(self.started) if entry[0] == name)
        _, _, log = self.started[index]
        with log.open("ab") as out:
            proc = subprocess.Popen(self.commands[name], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.started[index] = (name, proc, log)
        return proc

    def dead(self) -> tuple[str, subprocess.Popen, Path] | None:
        return next((entry for entry in self.started if entry[1].poll() is not None), None)

    def stop_all(self) -> None:
        if not self.started:
            return
        print(f"stopping {len(self.started)} process(es)", flush=True)
        for _, proc, _ in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _, proc, _ in self.started:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started = []


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class Stopping(Exception):
    """Ctrl-C or SIGTERM arrived while waiting for the processes to be ready."""


def wait_for_engines(engines: list[tuple[subprocess.Popen, Path]], stopping: list[int]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(engines)
    while pending:
        if stopping:
            raise Stopping()
        for proc, log in list(pending):
            text = log.read_text(errors="replace") if log.exists() else ""
            if "ready on" in text:
                print(next(line for line in text.splitlines() if "ready on" in line), flush=True)
                pending.remove((proc, log))
            elif proc.poll() is not None:
                raise RuntimeError(f"an engine exited before it was ready ({log}):\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"engines not ready within {READY_TIMEOUT_S:.0f} s: {[str(log) for _, log in pending]}")
        time.sleep(0.2)


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except Exception:
        return False


def wait_for_servers(servers: list[tuple[subprocess.Popen, Path, str]], stopping: list[int]) -> None:
    for proc, log, url in servers:
        deadline = time.monotonic() + 60
        while not healthy(f"{url}/health"):
            if stopping:
                raise Stopping()
            if proc.poll() is not None:
                raise RuntimeError(f"the server at {url} exited ({log}):\n{tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server at {url} is not healthy ({log}):\n{tail(log)}")
            time.sleep(0.2)


def run(fleet: Fleet, run_dir: Path) -> int:
    procs = Processes()
    stopping: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        addresses, engines = [], []
        for i, spec in enumerate(fleet.engines):
            address = spec.address or f"ipc://{run_dir}/engine-{i}.sock"
            log = run_dir / f"engine-{i}.log"
            name = spec.served_model_name or spec.model.name
            where = f" on {spec.device}" if spec.device else ""
            print(f"engine {i}: loading {spec.model} as {name!r}{where} (log: {log})")
            engines.append((procs.start(f"engine {i}", spec.command(address), log), log))
            addresses.append(address)
        sys.stdout.flush()
        wait_for_engines(engines, stopping)
        urls, servers = [], []
        for i in range(fleet.servers.count):
            port = fleet.servers.port + i
            log = run_dir / f"server-{port}.log"
            url = f"http://{fleet.servers.host}:{port}"
            servers.append((procs.start(f"server {port}", fleet.servers.command(port, addresses), log), log, url))
            urls.append(url)
        wait_for_servers(servers, stopping)
    except RuntimeError as exc:
        procs.stop_all()
        if stopping:  # Ctrl-C reaches every child too: one that exited first is no failure
            return 0
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Stopping:
        procs.stop_all()
        return 0
    pids = [str(proc.pid) for proc, _ in engines]
    what = f"1 engine (pid {pids[0]})" if len(pids) == 1 else f"{len(pids)} engines (pids {', '.join(pids)})"
    names = sorted({spec.served_model_name or spec.model.name for spec in fleet.engines})
    print(f"\nsplitinfer is up: {what}, {len(urls)} server(s); logs in {run_dir}")
    print("models: " + ", ".join(names))
    for url in urls:
        print(f"  {url}/v1")
    if fleet.servers.serves_page:
        print("chat page (in a browser): " + ", ".join(f"{url}/" for url in urls))
    print("\nTry:")
    print(f"  curl {urls[0]}/v1/chat/completions -H 'Content-Type: application/json' \\")
    if fleet.servers.api_key:
        print(f"    -H 'Authorization: Bearer {fleet.servers.api_key}' \\")
    body = f'{{"model": "{names[0]}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'
    print(f"    -d {shlex.quote(body)}")
    print("\nCtrl-C stops everything.", flush=True)
    restarts: dict[str, list[float]] = {}  # engine name -> when it was restarted
    while not stopping:
        dead = procs.dead()
        if dead is not None and not stopping:
            name, proc, log = dead
            recent = [t for t in restarts.get(name, []) if time.monotonic() - t < RESTART_WINDOW_S]
            if name.startswith("engine ") and fleet.restart_engines and len(recent) < MAX_RESTARTS:
                # The servers keep running and reconnect by themselves once it is ready again.
                print(
                    f"{name} (pid {proc.pid}) exited with {proc.returncode}; restarting it ({log})",
                    file=sys.stderr,
                    flush=True,
                )
                restarts[name] = [*recent, time.monotonic()]
                procs.restart(name)
                continue
            why = "; it was restarted too often" if recent else ""
            print(
                f"error: {name} (pid {proc.pid}) exited with {proc.returncode}{why}; stopping the others ({log})",
                file=sys.stderr,
            )
            procs.stop_all()
            return 1
        time.sleep(0.5)
    # Asked to stop (Ctrl-C, which a terminal sends to the whole process group, or SIGTERM):
    # a clean stop, whatever the children made of the signal themselves.
    procs.stop_all()
    return 0


def engine_help() -> str:
    """The engine's own settings, from its --help: printed from there, never copied."""
    out = subprocess.run([PYTHON, "-m", "splitinfer.engine", "--help"], capture_output=True, text=True, cwd=REPO)
    lines = out.stdout.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("model and memory:"))
        end = next(i for i, line in enumerate(lines) if line.startswith("serving:"))
    except StopIteration:
        return "Engine flags: run 'python -m splitinfer.engine --help'."
    return "\n".join(line for line in lines[start:end] if line.strip())


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n" + engine_help())
        return 0
    try:
        fleet, run_dir_arg = fleet_from_flags(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(run_dir_arg or REPO / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(fleet, run_dir.resolve())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
