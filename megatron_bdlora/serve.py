"""OpenAI-compatible multi-adapter server: `torchrun --nproc_per_node N -m megatron_bdlora.serve --mode M ...`.

  torchrun --nproc_per_node N -m megatron_bdlora.serve --megatron-dir MEG --mode block_diagonal|slora|replicated \\
      --adapter NAME=DIR [--adapter NAME=DIR ...] --max-loras K [--max-cpu-loras M] [--max-lora-rank R] \\
      [--max-model-len L] --host 127.0.0.1 --port P [--config serve.yaml] \\
      [--api-key KEY] [--enable-lora-runtime-updating] [--lora-root DIR ...] [--max-queued-requests Q]

TP is the world size. Rank 0 answers HTTP (vLLM's routes: /v1/completions, /v1/chat/completions, /v1/models,
/v1/load_lora_adapter, /v1/unload_lora_adapter, /tokenize, /detokenize, /version, /health, /metrics) and schedules
the engine; the other ranks step
in lockstep with it. Every flag is also a key of the --config YAML (max_loras for --max-loras; `adapters` is a
mapping NAME: DIR); flags override the YAML, --adapter adds to its adapters. Arguments are checked before any
process group exists: a bad one exits 2 with one `error: ...` line. SIGTERM/SIGINT on rank 0 stops accepting
connections, lets in-flight requests finish (up to --drain-timeout) and exits 0; a second SIGINT cancels them.
If the engine dies (e.g. a TP rank failed), rank 0 exits 1 at once instead of answering errors; if it stops
finishing steps (a rank hung in a collective), /health answers 503 after --engine-step-timeout and every rank exits
non-zero after --engine-dead-timeout.

Exposing it: --api-key (or $MEGATRON_BDLORA_API_KEY) guards every /v1/* route and /tokenize, /detokenize (/health,
/metrics and /version stay open);
runtime adapter loading is off unless --enable-lora-runtime-updating, and --lora-root limits it to directories
under the given roots; bodies, stop sequences and requests in flight are bounded (413 / 400 / 429).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import uvicorn
import yaml

from megatron_bdlora import parallel
from megatron_bdlora.base_models import EMBEDDED, ensure_megatron_base, resolve_hf_base
from megatron_bdlora.checkpoint.base_model import BaseModelError
from megatron_bdlora.config_file import ConfigError, build_section
from megatron_bdlora.inference.policy import API_KEY_ENV, ServerPolicy, api_key_from
from megatron_bdlora.inference.routes import build_app
from megatron_bdlora.inference.serving_config import ServingConfig
from megatron_bdlora.jsonfiles import read_json_object
from megatron_bdlora.sharding import Mode

if TYPE_CHECKING:
    from megatron_bdlora.inference.serving_loop import ServingLoop

MODES = tuple(m.value for m in Mode)  # the sharding plan owns the list
DTYPES = ("float32", "bfloat16", "float16")
ON_OFF = ("on", "off")
_POLICY = ServerPolicy()  # the HTTP limits' defaults
# collectives time out this long after --engine-dead-timeout: rank 0's watchdog, which names the cause, acts first;
# a follower whose rank 0 is gone fails at once (its peer's socket closes) or at this bound
COLLECTIVE_GRACE_S = 10.0


def _opt(help: str, default: Any = None, engine: bool = False, required: bool = False) -> Any:
    """A ServeOptions field; `engine`: a ServingConfig field of the same name (whose default --help shows, unless the
    CLI requires the setting); `{default}` in the help places the default, which otherwise ends it."""
    return field(default=default, metadata={"help": help, "engine": engine, "required": required})


@dataclass
class ServeOptions:
    """Every serving setting: a --config YAML key, or the flag of the same name (which wins).

    None: the engine's default (ServingConfig's, which --help shows)."""

    megatron_dir: str | None = _opt(
        "base model: a megatron checkpoint sharded for this TP (tools/convert_hf_to_megatron.py), or a Hugging Face "
        "Llama directory (converted for this TP once and cached, as the trainer does); default: the embedded "
        "SmolLM2-135M-Instruct", engine=True)
    mode: str | None = _opt("LoRA sharding over the TP ranks (required): block_diagonal (BD-LoRA), slora or "
                            "replicated; an adapter that cannot run in it is rejected at start", engine=True,
                            required=True)
    adapters: dict | None = _opt("adapters registered at start: name -> native or PEFT adapter directory", engine=True)
    max_loras: int | None = _opt("adapter slots on the device: adapters usable in one step", engine=True)
    max_cpu_loras: int | None = _opt("adapters kept in host memory, at least max-loras (default: max-loras, as vLLM; "
                                     "others are re-read from disk when needed)", engine=True)
    max_lora_rank: int | None = _opt("largest adapter rank the slots hold", engine=True)
    max_model_len: int | None = _opt("context length: prompt + generated tokens of one request", engine=True)
    max_num_seqs: int | None = _opt("requests decoded concurrently; more wait in a queue", engine=True)
    max_num_batched_tokens: int | None = _opt("tokens processed per engine step", engine=True)
    kv_cache_gb: float | None = _opt("KV cache size in GB", engine=True)
    block_size: int | None = _opt("KV cache block size in tokens", engine=True)
    dtype: str | None = _opt("compute dtype: float32, bfloat16 or float16", engine=True)
    seed: int | None = _opt("engine seed for requests without their own `seed`", engine=True)
    cuda_graphs: str | None = _opt("decode steps replayed from CUDA graphs captured at start-up (megatron's own, per "
                                   "layer and decode batch size; LoRA launches sized for max-lora-rank): on or off "
                                   "(default {default}; on needs a GPU)", engine=True)
    host: str = _opt("address to listen on (0.0.0.0: all interfaces)", "127.0.0.1")
    port: int = _opt("port to listen on (0: a free port; the line `serving on http://HOST:PORT` says which)", 8000)
    served_model_name: str | None = _opt(
        "model id of the base model in the API (default: the embedded model's name or the base directory's name)")
    tp: int | None = _opt("expected TP degree: must equal the number of launched ranks (launch/serve.sh starts that "
                          "many)")
    drain_timeout: float = _opt("seconds in-flight requests may take to finish after SIGTERM/SIGINT before they are "
                                "cancelled", 60.0)
    api_key: str | None = _opt(f"require `Authorization: Bearer KEY` on every /v1/* route (401 otherwise; /health and "
                               f"/metrics stay open); default: ${API_KEY_ENV}, else none (open: bind 127.0.0.1 then)")
    enable_lora_runtime_updating: bool = _opt("serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (404 "
                                              "otherwise, as vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING)", False)
    lora_root: list[str] | None = _opt("with runtime updating: load adapters only from directories under DIR (after "
                                       "resolving symlinks and ..); repeat for more; default: any path")
    max_queued_requests: int = _opt("generation requests in flight (tokenising, waiting or running); beyond it a 429 "
                                    "with Retry-After", _POLICY.max_queued_requests)
    max_request_bytes: int = _opt("largest request body in bytes (413 beyond it)", _POLICY.max_request_bytes)
    max_stop_sequences: int = _opt("stop strings per request", _POLICY.max_stop_sequences)
    max_stop_length: int = _opt("characters per stop string", _POLICY.max_stop_length)
    max_stop_token_ids: int = _opt("stop token ids per request", _POLICY.max_stop_token_ids)
    engine_step_timeout: float = _opt("seconds the engine may go without finishing a step before /health answers "
                                      "503", _POLICY.engine_step_timeout)
    engine_dead_timeout: float = _opt("seconds the engine may go without finishing a step before the server exits "
                                      "non-zero (a TP rank dead or hung; collectives time out 10 s later on "
                                      "every rank)", _POLICY.engine_dead_timeout)


ENGINE_KEYS = tuple(f.name for f in fields(ServeOptions) if f.metadata["engine"])
_ENGINE_DEFAULTS = {f.name: f.default for f in fields(ServingConfig) if f.default is not MISSING}


def _shown_default(f: Field) -> Any:
    """The default --help states for a setting: its own, else the engine's (ServingConfig's field), as a flag value."""
    default = f.default
    if default is None and f.metadata["engine"] and not f.metadata["required"]:
        default = _ENGINE_DEFAULTS.get(f.name)
    if isinstance(default, bool):
        return ON_OFF[0] if default else ON_OFF[1]
    return default


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line on stderr and exit 2 (argparse would print the usage first)."""
        self.exit(2, f"error: {message}\n")


def flag(key: str) -> str:
    """The command-line flag of a config key (max_loras -> --max-loras); serve_cluster shares the rule."""
    return "--" + key.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per ServeOptions field (--adapter NAME=DIR for `adapters`), plus --config."""
    p = _Parser(prog="python -m megatron_bdlora.serve", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
                allow_abbrev=False)
    p.add_argument("--config", metavar="YAML", help="YAML file with any of the settings below as keys (max_loras: 8, "
                   "adapters: {name: dir}, tp: 8, ...); flags given here override it; an unknown key is an error")
    hints = typing.get_type_hints(ServeOptions)
    for f in fields(ServeOptions):
        if f.name == "adapters":
            p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                           help="register an adapter (native or PEFT directory) under NAME, the `model` clients ask "
                                "for; repeat for more")
            continue
        if f.name == "enable_lora_runtime_updating":
            p.add_argument(flag(f.name), dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        if f.name == "lora_root":
            p.add_argument(flag(f.name), dest=f.name, action="append", metavar="DIR", help=f.metadata["help"])
            continue
        kind = next(a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None))
        choices = {"mode": MODES, "dtype": DTYPES, "cuda_graphs": ON_OFF}.get(f.name)
        default, help_text = _shown_default(f), f.metadata["help"]
        if "{default}" in help_text:
            help_text = help_text.format(default=default)
        elif default is not None:
            help_text += f" (default {default})"
        metavar = None if choices else {"megatron_dir": "DIR", "served_model_name": "NAME", "host": "HOST"}.get(
            f.name, {int: "N", float: "X"}.get(kind, "VALUE"))
        p.add_argument(flag(f.name), dest=f.name, type=kind, choices=choices, metavar=metavar, help=help_text)
    return p


def read_yaml(path: str) -> dict:
    """A --config file's mapping, or ConfigError naming the file and what is wrong (serve_cluster reads its own)."""
    if not Path(path).is_file():
        raise ConfigError(f"--config: config file {path} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of settings, got {type(raw).__name__}")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def load_options(argv: list[str] | None) -> tuple[ServeOptions, dict[str, str]]:
    """Settings from --config YAML overridden by flags, and where each given one came from (for error messages)."""
    given = vars(build_parser().parse_args(argv))
    config = given.pop("config", None)
    raw = read_yaml(config) if config is not None else {}
    where = {key: f"{key} in {config}" for key in raw}
    if isinstance(raw.get("cuda_graphs"), bool):  # YAML 1.1 reads a bare on/off as a boolean
        raw["cuda_graphs"] = ON_OFF[0] if raw["cuda_graphs"] else ON_OFF[1]
    if isinstance(raw.get("lora_root"), str):  # one root, or a list
        raw["lora_root"] = [raw["lora_root"]]
    try:
        opts = build_section(ServeOptions, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{config}: {err}") from None
    adapters = dict(opts.adapters or {})
    for name, path in adapters.items():
        if not isinstance(name, str) or not isinstance(path, str):
            raise ConfigError(f"adapters in {config} must map adapter names to directories, got {name!r}: {path!r}")
        where[f"adapter {name}"] = f"adapters.{name} in {config}"
    cli_adapters: set[str] = set()
    for item in given.pop("adapter", []):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter expects NAME=DIR, got {item!r}")
        if name in cli_adapters:
            raise ConfigError(f"--adapter {name} is given twice")
        cli_adapters.add(name)
        adapters[name] = path
        where[f"adapter {name}"] = f"--adapter {name}"
    opts.adapters = adapters
    roots = given.pop("lora_root", None)
    if roots is not None:  # flags add to the YAML's roots, as --adapter does
        opts.lora_root = [*(opts.lora_root or ()), *roots]
        where["lora_root"] = "--lora-root"
    for key, value in given.items():
        setattr(opts, key, value)
        where[key] = flag(key)
    return opts, where


def check_options(opts: ServeOptions, where: dict[str, str], world_size: int) -> None:
    """Value checks that need no model files; ConfigError names the flag or YAML key at fault."""

    def name(key: str) -> str:
        return where.get(key, flag(key))

    if opts.mode is None:
        raise ConfigError(f"--mode is required (or `mode` in --config): one of {', '.join(MODES)}")
    if opts.mode not in MODES:
        raise ConfigError(f"{name('mode')} must be one of {', '.join(MODES)}, got {opts.mode!r}")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise ConfigError(f"{name('dtype')} must be one of {', '.join(DTYPES)}, got {opts.dtype!r}")
    if opts.cuda_graphs is not None and opts.cuda_graphs not in ON_OFF:
        raise ConfigError(f"{name('cuda_graphs')} must be on or off, got {opts.cuda_graphs!r}")
    for key in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_model_len", "max_num_seqs",
                "max_num_batched_tokens", "block_size", "tp"):
        value = getattr(opts, key)
        if value is not None and value < 1:
            raise ConfigError(f"{name(key)} must be >= 1, got {value}")
    if opts.max_cpu_loras is not None and opts.max_loras is not None and opts.max_cpu_loras < opts.max_loras:
        raise ConfigError(f"{name('max_cpu_loras')} ({opts.max_cpu_loras}) is below {name('max_loras')} "
                          f"({opts.max_loras}): every adapter on the device is also cached on the host")
    if opts.kv_cache_gb is not None and not opts.kv_cache_gb > 0:
        raise ConfigError(f"{name('kv_cache_gb')} must be > 0, got {opts.kv_cache_gb}")
    if opts.drain_timeout < 0:
        raise ConfigError(f"{name('drain_timeout')} must be >= 0 seconds, got {opts.drain_timeout}")
    for key in ("max_queued_requests", "max_request_bytes", "max_stop_sequences", "max_stop_length",
                "max_stop_token_ids"):
        if getattr(opts, key) < 1:
            raise ConfigError(f"{name(key)} must be >= 1, got {getattr(opts, key)}")
    for key in ("engine_step_timeout", "engine_dead_timeout"):
        if not getattr(opts, key) > 0:
            raise ConfigError(f"{name(key)} must be > 0 seconds, got {getattr(opts, key)}")
    for root in opts.lora_root or ():
        if not Path(root).expanduser().is_dir():
            raise ConfigError(f"{name('lora_root')}: {root} is not a directory")
    if opts.lora_root and not opts.enable_lora_runtime_updating:
        raise ConfigError(f"{name('lora_root')} limits runtime adapter loading, which is off: add "
                          "--enable-lora-runtime-updating (or drop --lora-root)")
    if not 0 <= opts.port <= 65535:
        raise ConfigError(f"{name('port')} must be a TCP port in 0..65535, got {opts.port}")
    if not opts.host:
        raise ConfigError(f"{name('host')} must not be empty")
    if opts.tp is not None and opts.tp != world_size:
        raise ConfigError(f"{name('tp')} is {opts.tp}, but {world_size} rank(s) were launched (WORLD_SIZE): TP is the "
                          "number of ranks (launch/serve.sh starts as many as tp)")
    for adapter, path in (opts.adapters or {}).items():
        source = where.get(f"adapter {adapter}", "--adapter")
        if not Path(path).is_dir():
            raise ConfigError(f"{source}: adapter directory {path} does not exist")
        if adapter == opts.served_model_name:
            raise ConfigError(f"{source}: the adapter name is also the base model's name ({name('served_model_name')})")


def locate_base(opts: ServeOptions, where: dict[str, str], world_size: int) -> tuple[str, Path | None]:
    """What the base is: ('embedded', None), ('hf', dir) or ('megatron', dir) - checked, not converted yet."""
    if opts.megatron_dir is None:
        return "embedded", None
    flag, path = where.get("megatron_dir", "--megatron-dir"), Path(opts.megatron_dir)
    if not path.is_dir():
        raise ConfigError(f"{flag}: {path} does not exist or is not a directory")
    if (path / "meta.json").is_file():
        meta = read_json_object(path / "meta.json", ConfigError)
        if meta.get("tp") != world_size:
            raise ConfigError(f"{flag}: {path} is sharded for tp={meta.get('tp')}, but {world_size} rank(s) were "
                              "launched; launch that many ranks, or give the Hugging Face directory to convert it for "
                              "this TP")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{flag}: {path} has no config.json (an incomplete megatron checkpoint)")
        return "megatron", path
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf", path
    raise ConfigError(f"{flag}: {path} is neither a megatron checkpoint (meta.json) nor a Hugging Face model directory "
                      "(config.json + *.safetensors)")


def prepare_base(kind: str, path: Path | None, world_size: int) -> tuple[Path, str, str]:
    """(megatron checkpoint for this TP, default model id, path shown as the base's `root`); converts once, cached."""
    if kind == "embedded":
        hf_dir = resolve_hf_base(EMBEDDED)
        return ensure_megatron_base(hf_dir, world_size), EMBEDDED, str(hf_dir)
    assert path is not None
    megatron_dir = path if kind == "megatron" else ensure_megatron_base(path, world_size)
    return megatron_dir, path.resolve().name, str(path)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (listening starts with the server), so that a busy port fails before the model
    loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class HTTPServer(uvicorn.Server):
    """uvicorn on a socket bound in advance: prints `serving on http://HOST:PORT` once listening; signals are ours."""

    def __init__(self, app: Any, sock: socket.socket, host: str, drain_timeout: float | None = None):
        super().__init__(uvicorn.Config(app, log_level="warning", lifespan="off",
                                        timeout_graceful_shutdown=drain_timeout))
        self.sock = sock
        port = sock.getsockname()[1]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Answer requests until should_exit is set, then wait for in-flight ones (up to drain_timeout)."""
        self.run(sockets=[self.sock])

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # uvicorn's own handlers would re-raise the signal at exit, killing us instead of exiting 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"serving on {self.url}", flush=True)


def policy_of(opts: ServeOptions) -> ServerPolicy:
    """The HTTP server's limits and permissions: the settings of the same names, the roots of --lora-root, the key
    of --api-key or else the environment."""
    same = {f.name: getattr(opts, f.name) for f in fields(ServerPolicy) if hasattr(opts, f.name)}
    return ServerPolicy(**{**same, "api_key": api_key_from(opts.api_key), "lora_roots": tuple(opts.lora_root or ())})


def _exit_now(message: str) -> typing.NoReturn:
    """Exit 1 without waiting on anything: the engine thread may sit in a collective that never returns."""
    print(f"error: {message}; exiting", file=sys.stderr, flush=True)
    os._exit(1)


def _watch_engine(loop: "ServingLoop", stopping: threading.Event, dead_after_s: float,
                  interval_s: float = 0.5) -> None:
    """Exit the process (1) as soon as the engine dies or stops finishing steps (a rank dead or hung), rather than
    answering every request with an error or hanging."""
    while not stopping.wait(interval_s):
        if stopping.is_set():
            return
        if not loop.healthy():
            _exit_now("the serving engine stopped unexpectedly (its error is above)")
        stalled = time.monotonic() - loop.last_step_at
        if stalled > dead_after_s:
            _exit_now(f"the serving engine has not finished a step for {stalled:.0f} s (--engine-dead-timeout "
                      f"{dead_after_s:g}): a TP rank is dead or hung")


def _warn_if_open(opts: ServeOptions, policy: ServerPolicy) -> None:
    """Say it when a server reachable from other hosts has no API key."""
    if policy.api_key is None and opts.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {opts.host} without an API key: anyone who reaches the port can use the server; "
              f"set --api-key or ${API_KEY_ENV}", file=sys.stderr, flush=True)


def serve_http(loop: "ServingLoop", sock: socket.socket, opts: ServeOptions, served_name: str, base_root: str) -> int:
    """Rank 0: HTTP until SIGTERM/SIGINT, then drain the engine (which also stops the other ranks)."""
    policy = policy_of(opts)
    _warn_if_open(opts, policy)
    app = build_app(loop, served_model_name=served_name, base_root=base_root, adapter_paths=opts.adapters,
                    policy=policy)
    server = HTTPServer(app, sock, opts.host, opts.drain_timeout)
    drain = True

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal drain
        if server.should_exit and signum == signal.SIGINT:  # a second Ctrl-C: cancel what is still running
            server.force_exit, drain = True, False
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    stopping = threading.Event()
    loop.start()
    threading.Thread(target=_watch_engine, args=(loop, stopping, policy.engine_dead_timeout), name="engine-watchdog",
                     daemon=True).start()
    try:
        server.serve_forever()
    finally:
        stopping.set()
        # requests still running after the HTTP drain finish within their own max_tokens; a hung rank never does
        if not loop.shutdown(drain=drain, timeout=opts.drain_timeout + policy.engine_dead_timeout):
            _exit_now("the serving engine did not stop in time")
    return 0


def follow(loop: "ServingLoop", rank: int) -> int:
    """Ranks != 0: step with rank 0 until it shuts the loop down; a signal here waits for rank 0's drain."""

    def on_signal(signum: int, frame: Any) -> None:
        os.write(2, f"rank {rank}: {signal.Signals(signum).name}: stopping when rank 0 has drained\n".encode())

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        loop.run_follower()
    except Exception:  # a failed collective: nothing to clean up that would not hang
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Check everything, create the process group and the engine, then serve HTTP (rank 0) or follow; the exit code."""
    # the variables init_parallel reads (torchrun's, else srun's): needed before any process group exists
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        opts, where = load_options(argv)
        check_options(opts, where, world_size)
        kind, base_path = locate_base(opts, where, world_size)
        sock = listen_socket(opts.host, opts.port) if rank == 0 else None
        megatron_dir, default_name, base_root = prepare_base(kind, base_path, world_size)
    except (ConfigError, FileNotFoundError, ValueError, BaseModelError) as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)  # one line
        return 2
    # lazy: the engine's imports (megatron-core) take seconds; they load once the flags and files are checked
    from megatron_bdlora.inference.serving_loop import ServingLoop

    info = parallel.init_parallel(tp_size=world_size, timeout_s=opts.engine_dead_timeout + COLLECTIVE_GRACE_S)
    engine = {key: getattr(opts, key) for key in ENGINE_KEYS if getattr(opts, key) is not None}
    if "cuda_graphs" in engine:
        engine["cuda_graphs"] = engine["cuda_graphs"] == "on"
    try:
        config = ServingConfig(**{**engine, "megatron_dir": megatron_dir, "adapters": dict(opts.adapters)})
        loop = ServingLoop.create(config, info)
    except (ValueError, FileNotFoundError) as err:  # adapters that do not fit the base or the mode: alike on every rank
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info.rank == 0:
        assert sock is not None
        code = serve_http(loop, sock, opts, opts.served_model_name or default_name, base_root)
    else:
        code = follow(loop, info.rank)
    parallel.destroy_parallel()
    return code


if __name__ == "__main__":
    sys.exit(main())
