"""The serving loop: many adapters in one batch on megatron-core's DynamicInferenceEngine, every TP rank in lockstep.

Every rank holds the same state machine: the engine (paged KV cache, continuous batching, chunked prefill,
pausing and eviction), the adapter pool, the requests waiting for an adapter slot. Rank 0 alone talks to
the outside (submit, cancel, load, unload, shutdown): each step it broadcasts what arrived since the last step
(`broadcast_object_list`), then every rank applies the same message, admits the same requests into the same
slots and runs the same engine step. Each request carries its slot as engine request metadata
(`lora_slot`); before each forward the per-token slots are grouped once (lora_batch.SlotBatch) and handed to every
LoRA layer, so one forward serves every adapter of the batch with the sharding plan's own communication
(none for block-diagonal adapters).

What fails for one request fails that request alone (an 'error' event), on every rank alike: a sampling failure
(the same on every rank, computed from the same state) or an adapter that can no longer be read. Each rank reads
adapter files itself, so reading is the one place where ranks may disagree: after each read (registration, or a
re-read of an adapter dropped from the host cache) the ranks agree with one all-reduce, and a name only ever serves
the bytes it was registered with (sha256).

Re-reads happen off the engine's critical path (SGLang's overlap loading): a request whose adapter has no host copy
asks each rank's background reader for one and waits, while requests for cached adapters are admitted and decoded
as usual. Ranks finish reads at different times, so on each step with reads in flight (and only then) one small
all-reduce(MIN) of every pending read's done/ok flags decides, alike on every rank, which copies are ready.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference import inference_request as ir
from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.transformer.cuda_graphs import delete_cuda_graphs
from transformers import AutoTokenizer

from megatron_bdlora.checkpoint.hf import load_megatron_rank_state
from megatron_bdlora.comm_count import count_collectives
from megatron_bdlora.inference import adapter_slots
from megatron_bdlora.inference.megatron_engine import build_dynamic_engine
from megatron_bdlora.inference.pool import AdapterPool
from megatron_bdlora.inference.prompt_scores import PromptScores
from megatron_bdlora.inference.requests import (
    AdapterConflictError,
    GenerationParams,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
)
from megatron_bdlora.inference.sampling import RequestSamplers, SeededSamplingController
from megatron_bdlora.inference.serving_config import ServingConfig
from megatron_bdlora.layers import LoRAAdapter, LoRAParallelLinear
from megatron_bdlora.lora_batch import SlotBatch
from megatron_bdlora.model import build_model, load_base_state_dict, lora_layers

log = logging.getLogger(__name__)

GRAPH_MAX_BLOCKS = 8  # block-diagonal blocks per rank that CUDA-graph launches are sized for (checked at load)
HEARTBEAT_S = 0.5  # an idle rank 0 still broadcasts this often, so followers never wait on a dead collective
READ_POLL_S = 0.005  # with nothing to decode but adapter reads in flight, rank 0 steps this often (not a busy loop)


# ---------------------------------------------------------------- messages from rank 0 to every rank
# What rank 0 takes from callers between two steps; broadcast (pickled) to every rank, which applies them in order.


@dataclass(frozen=True)
class AddRequest:
    """Queue a request for an adapter slot."""

    request: GenerationRequest


@dataclass(frozen=True)
class CancelRequest:
    """Remove a request wherever it is (client gone, or already finished by a stop on rank 0)."""

    request_id: int


@dataclass(frozen=True)
class RegisterAdapter:
    """Add an adapter to every rank's pool (read and checked on rank 0 before it is sent); every rank must read
    the files rank 0 read (`digest`)."""

    name: str
    path: str
    digest: str


@dataclass(frozen=True)
class UnregisterAdapter:
    """Forget an adapter once its running and waiting requests are done."""

    name: str


@dataclass(frozen=True)
class Stop:
    """Stop every rank's loop, after the requests in flight finish if `drain`, else cancelling them."""

    drain: bool


Message = AddRequest | CancelRequest | RegisterAdapter | UnregisterAdapter | Stop
AdapterMessage = RegisterAdapter | UnregisterAdapter  # the ones a caller waits for until every rank applied them


class AdapterReadError(ValueError):
    """An adapter that one TP rank or more could not read (or read with other bytes): refused on every rank alike."""


@dataclass
class _Live:
    """Rank 0's view of one request: where its events go and what has been shown so far."""

    request: GenerationRequest
    events: "queue.Queue[TokenEvent] | None"
    tokens: list[int] = field(default_factory=list)  # visible tokens
    text: str = ""  # text sent so far
    done: bool = False
    sent: bool = False  # an event was sent (the first one carries the prompt log-probabilities)
    stop_from: int | None = None  # with min_tokens: text length before which no stop string may end


@dataclass(frozen=True)
class _ReadJob:
    """Read one adapter's host copy in the background; a registered adapter must have its registered bytes."""

    name: str
    path: str
    digest: str | None


@dataclass(frozen=True)
class _ReadResult:
    """One background read on this rank: the host copy, or why it could not be read."""

    host: adapter_slots.HostAdapter | None
    error: Exception | None


class _ReadTimes:
    """Latency of this rank's adapter reads: written by the reading threads, read by /metrics and the benchmark."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self.count, self.total, self.max = 0, 0.0, 0.0
        self.recent: deque[float] = deque(maxlen=keep)  # for medians, without growing with the server's age

    def record(self, seconds: float) -> None:
        with self._lock:
            self.count += 1
            self.total += seconds
            self.max = max(self.max, seconds)
            self.recent.append(seconds)

    def snapshot(self) -> tuple[int, float, float, list[float]]:
        """(reads, seconds in all, longest, the recent latencies) at one instant."""
        with self._lock:
            return self.count, self.total, self.max, list(self.recent)


class _HostReader:
    """One background thread per rank reading adapter host copies, so that no engine step waits on a disk read.

    Its results are this rank's alone: the loop uses one only once every rank has finished the same read."""

    def __init__(self, read: Callable[[str, str, str | None], adapter_slots.HostAdapter]) -> None:
        self._read = read
        self._jobs: "queue.Queue[_ReadJob | None]" = queue.Queue()  # None: stop
        self._results: dict[str, _ReadResult] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # started by the first read (most loops never re-read)

    def submit(self, job: _ReadJob) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="adapter-reader", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def result(self, name: str) -> _ReadResult | None:
        """The finished read of `name`, or None while it runs."""
        with self._lock:
            return self._results.get(name)

    def forget(self, name: str) -> None:
        """Drop a result once the ranks have agreed on it (the next read of the name starts afresh)."""
        with self._lock:
            del self._results[name]

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                result = _ReadResult(self._read(job.name, job.path, job.digest), None)
            except Exception as err:  # any failure fails the adapter's requests; the thread must go on
                log.warning("cannot read adapter %r from %s: %s", job.name, job.path, err)
                result = _ReadResult(None, err)
            with self._lock:
                self._results[job.name] = result


def _track_lora_slot() -> None:
    """Make `lora_slot` a tracked per-request engine field that survives eviction (megatron 0.16 drops added
    sampling attributes when it checkpoints an evicted request)."""
    if getattr(ir.DynamicInferenceRequest, "_bdlora_slot_tracked", False):
        return
    base_types = ir.DynamicInferenceRequest.get_metadata_types

    def get_metadata_types() -> list:
        return base_types() + [("lora_slot", torch.int32, True)]

    base_checkpoint = ir.DynamicInferenceRequestRecord.checkpoint

    def checkpoint(self, *args, **kwargs):
        slot = self[-1].sampling_params.lora_slot
        base_checkpoint(self, *args, **kwargs)
        self[-1].sampling_params.add_attributes({"lora_slot": slot})

    # requests made by megatron itself (the dummy requests of CUDA-graph capture) use no adapter
    SamplingParams.lora_slot = -1
    ir.DynamicInferenceRequest.get_metadata_types = staticmethod(get_metadata_types)
    ir.DynamicInferenceRequestRecord.checkpoint = checkpoint
    ir.DynamicInferenceRequest._bdlora_slot_tracked = True


class ServingLoop:
    """One TP rank's serving state; rank 0 also owns the request queues (thread-safe calls below)."""

    def __init__(self, config: ServingConfig, info: Any, model: torch.nn.Module, tokenizer: Any) -> None:
        _track_lora_slot()
        self.config, self.info, self.model, self.tokenizer = config, info, model, tokenizer
        self.is_leader = info.rank == 0
        self.hf_config = model.hf_config
        self.max_model_len = config.max_model_len
        self.base_name = config.megatron_dir.name
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
        self.max_step_tokens = self._token_budget(config.max_num_batched_tokens, info.tp_size)
        self._lora_layers = [m for m in model.modules() if isinstance(m, LoRAParallelLinear)]
        self._slot_buffers = None  # the step's slot metadata, refilled in place (CUDA-graph safe)
        model.register_forward_pre_hook(self._set_step_slots, with_kwargs=True)  # before the engine captures graphs
        if config.cuda_graphs:
            self._prepare_cuda_graphs(model)
        layers = lora_layers(model)
        for slot in range(config.max_loras):
            adapter_slots.write_slot(layers, slot, None)
        self.engine = build_dynamic_engine(
            model,
            tokenizer,
            max_sequence_length=config.max_model_len,
            max_requests=config.max_num_seqs,
            max_tokens=self.max_step_tokens,
            buffer_size_gb=config.kv_cache_gb,
            block_size_tokens=config.block_size,
            params_dtype=next(model.parameters()).dtype,
            random_seed=config.seed,
            controller_cls=SeededSamplingController,
            cuda_graphs=config.cuda_graphs,
        )
        self.samplers = RequestSamplers(self.hf_config["vocab_size"], self.eos_id)
        self.prompt_scores = PromptScores()
        self.engine.controller.samplers = self.samplers
        self.engine.controller.prompt_scores = self.prompt_scores
        self.read_times = _ReadTimes()  # this rank's own reads (registration, the check of a load, re-reads)
        self._reader = _HostReader(self._read_host)
        # replicated state (identical on every rank)
        self.digests: dict[str, str] = {}  # adapter -> sha256 of the files every rank read when it was registered
        self.pool = AdapterPool(
            config.max_loras,
            config.max_cpu_loras or config.max_loras,  # vLLM's default; adapters beyond it are re-read when needed
            self._load_agreed,
            lambda slot, host: adapter_slots.write_slot(layers, slot, host),
            lambda slot: adapter_slots.write_slot(layers, slot, None),
        )
        for name, path in config.adapters.items():
            self.pool.register(name, str(path))  # every rank, agreed: a rank that cannot read one fails them all
        self.waiting: deque[GenerationRequest] = deque()  # admitted to the server, waiting for an adapter slot
        self.reading: dict[str, str] = {}  # adapter -> path: background reads in flight on some rank, in request order
        self.read_ahead: dict[str, adapter_slots.HostAdapter] = {}  # read on every rank, waiting for a slot
        self.read_failures: dict[str, str] = {}  # adapter -> why some rank could not read it (its requests fail)
        self.adapter_of: dict[int, str | None] = {}  # requests in the engine -> adapter (to release)
        self.unloading: list[str] = []
        self.deferred_aborts: set[int] = set()  # cancelled during their chunked prefill
        self.stopping = False
        self.step_count = 0
        self.counters: Counter = Counter()
        self.count_collectives = False  # tests/benchmarks: count collectives of each engine step
        self.step_collectives: Counter = Counter()
        self.last_step_at = time.monotonic()  # when this rank last finished a step (the server's liveness check)
        # rank 0 only
        self._inbox: "queue.Queue[Message]" = queue.Queue()
        self._ids = itertools.count()
        self._live: dict[int, _Live] = {}
        self._done: dict[AdapterMessage, threading.Event] = {}  # adapter message -> caller waiting for it
        self._operations: dict[str, str] = {}  # adapter name -> the load or unload in progress for it
        self._operations_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _prepare_cuda_graphs(model: torch.nn.Module) -> None:
        """What megatron's CUDA graphs need from us (beyond build_model's graph-safe RNG tracker): no graphs of an
        earlier engine in its process-wide record, and LoRA kernel launches sized for the slots' capacity
        (adapters are loaded after the capture)."""
        delete_cuda_graphs()  # megatron keeps graphs in one process-wide record: an earlier engine's would be replayed
        for module in model.modules():
            if isinstance(module, LoRAAdapter):
                module.enable_graph_launch(GRAPH_MAX_BLOCKS)

    @staticmethod
    def _token_budget(requested: int, tp: int) -> int:
        """Tokens per step, rounded up to what megatron pads a step to (a multiple of 64 and of TP)."""
        return DynamicInferenceContext.round_up_tokens(requested, tp)

    @classmethod
    def create(cls, config: ServingConfig, info: Any) -> "ServingLoop":
        """Build the model with `max_loras` adapter slots, load this rank's base shards, start the engine."""
        if config.cuda_graphs and not torch.cuda.is_available():
            raise ValueError("cuda_graphs (--cuda-graphs on) needs a CUDA GPU; this host has none")
        hf_config = json.loads((Path(config.megatron_dir) / "config.json").read_text())
        settings = adapter_slots.serving_settings(config.mode, info.tp_size, config.max_lora_rank)
        model = build_model(hf_config, info.tp_size, settings, config.dtype, slots=config.max_loras,
                            cuda_graphs=config.cuda_graphs).to(info.device)  # built on the host (megatron's CPU init)
        load_base_state_dict(model, load_megatron_rank_state(Path(config.megatron_dir), info.tp_rank, info.tp_size))
        tokenizer = AutoTokenizer.from_pretrained(config.megatron_dir)
        return cls(config, info, model.eval(), tokenizer)

    # ---------------------------------------------------------------- rank 0: thread-safe API
    def submit(
        self, prompt_ids: list[int], adapter: str | None, params: GenerationParams
    ) -> tuple[int, "queue.Queue[TokenEvent]"]:
        """Queue a request; ValueError for bad params or prompt, KeyError for an unknown adapter."""
        if self.stopping or not self.healthy():
            raise RuntimeError("the server is shutting down")
        params.check(len(prompt_ids), self.max_model_len, self.hf_config["vocab_size"])
        if adapter is not None and (adapter not in self.pool.names() or adapter in self.unloading):
            raise KeyError(f"unknown model {adapter!r}; served: {[self.base_name] + self.adapter_names()}")
        if params.seed is None and not params.greedy:
            params = replace(params, seed=random.getrandbits(63))
        request = GenerationRequest(next(self._ids), tuple(int(t) for t in prompt_ids), adapter, params)
        events: "queue.Queue[TokenEvent]" = queue.Queue()
        self._live[request.request_id] = _Live(request, events)
        self._inbox.put(AddRequest(request))
        return request.request_id, events

    def cancel(self, request_id: int) -> None:
        """Abort a request (client gone); its queue gets a final 'abort' event."""
        self._inbox.put(CancelRequest(request_id))

    def load_adapter(self, name: str, path: str) -> None:
        """Register an adapter on every rank: its files read, checked and hashed here first (ValueError /
        FileNotFoundError), then every rank reads the same bytes. ValueError if the name is taken,
        AdapterConflictError while another load or unload of the name is in progress.

        The name is the caller's to check (the HTTP front end answers an empty, taken or base-model name with
        vLLM's errors); the pool still refuses an empty or taken one, on every rank alike."""
        with self._operation(name, "load"):
            if name in self.pool.names():
                raise ValueError(f"adapter {name!r} is already registered")
            host = self._read_host(name, path)
            self._wait(RegisterAdapter(name, str(path), host.digest))

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; waits for its in-flight and waiting requests to finish first. KeyError if it is not
        loaded, AdapterConflictError while another load or unload of the name is in progress."""
        with self._operation(name, "unload"):
            if name not in self.pool.names() or name in self.unloading:
                raise KeyError(f"adapter {name!r} is not loaded")
            self._wait(UnregisterAdapter(name))

    @contextlib.contextmanager
    def _operation(self, name: str, operation: str) -> Iterator[None]:
        """Hold the name for one load or unload: a second one meanwhile is refused, never interleaved or queued."""
        with self._operations_lock:
            if name in self._operations:
                raise AdapterConflictError(name, self._operations[name])
            self._operations[name] = operation
        try:
            yield
        finally:
            with self._operations_lock:
                del self._operations[name]

    def adapter_names(self) -> list[str]:
        return [n for n in self.pool.names() if n not in self.unloading]

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for /metrics."""
        ctx = self.engine.context
        pool = self.pool.stats()
        reads, read_s, read_max, _ = self.read_times.snapshot()
        return {
            "running": float(ctx.total_request_count - ctx.paused_request_count),
            "paused": float(ctx.paused_request_count),
            "waiting": float(len(self.waiting) + len(self.engine.waiting_request_ids)),
            "generated_tokens_total": float(self.counters["generated_tokens"]),
            "prompt_tokens_total": float(self.counters["prompt_tokens"]),
            "requests_finished_total": float(self.counters["finished"]),
            "requests_failed_total": float(self.counters["failed"]),
            "engine_evictions_total": float(self.engine.evicted_request_count),
            "adapter_loads_total": float(pool["loads"]),
            "adapter_evictions_total": float(pool["evictions"]),
            "adapters_resident": float(pool["resident"]),
            "engine_steps_total": float(self.step_count),
            "adapter_reads_total": float(reads),
            "adapter_read_seconds_total": read_s,
            "adapter_read_seconds_max": read_max,
            "adapter_reads_pending": float(len(self.reading)),
            "steps_waiting_for_adapter_total": float(self.counters["steps_waiting_for_adapter"]),
        }

    def lora_info(self) -> dict[str, Any]:
        """vLLM's lora_requests_info: the slots, the adapters with requests in the engine and those waiting for a
        slot (from any thread: copies of the engine thread's containers, each copied in one C call under the GIL)."""
        running = list(self.adapter_of.values())
        waiting = [r.adapter for r in list(self.waiting)]
        return {
            "max_lora": self.config.max_loras,
            "running": sorted({a for a in running if a is not None}),
            "waiting": sorted({a for a in waiting if a is not None}),
        }

    def inflight(self) -> int:
        """Requests submitted and not yet finished (rank 0). The HTTP front end bounds its own count, which also holds
        requests still being tokenised."""
        return len(self._live)

    def healthy(self) -> bool:
        return self._error is None and (self._thread is None or self._thread.is_alive() or self.stopping)

    def start(self) -> None:
        """Rank 0: step in a background thread until shutdown."""
        self._thread = threading.Thread(target=self._run, name="serving-loop", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop every rank's loop (after the requests in flight finish, if drain); True once the loop thread has
        ended, False if it has not within `timeout` seconds (a rank hung in a collective)."""
        self._inbox.put(Stop(drain))
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def run_follower(self) -> None:
        """Ranks != 0: step in lockstep with rank 0 until it stops."""
        while not self.stopping:
            self.step(wait=True)

    def _run(self) -> None:
        try:
            while not self.stopping:
                self.step(wait=True)
        except BaseException as err:  # a collective failed (a rank died) or a bug: the server must not go on
            self._error = err
            raise
        finally:
            self._release_callers()

    def _release_callers(self) -> None:
        """The loop thread has ended: whoever still waits on it gets an answer (requests and adapter operations
        queued after the Stop, or everything if the loop failed)."""
        error = f"serving loop failed: {self._error}" if self._error is not None else None
        for live in list(self._live.values()):
            self._finish(live, "error" if error else "abort", error=error)
        for message in list(self._done):
            self._signal(message, RuntimeError(error or "the server is shutting down"))

    def _wait(self, message: AdapterMessage) -> None:
        """Queue an adapter operation for the next step and block until every rank has applied it (RuntimeError if
        the loop stops or fails first)."""
        done = self._done[message] = threading.Event()
        done.error = None
        self._inbox.put(message)
        while not done.wait(0.2):
            if self._error is not None or (self._thread is not None and not self._thread.is_alive()):
                self._done.pop(message, None)
                raise RuntimeError(f"serving loop stopped: {self._error or 'shut down'}")
        if done.error is not None:
            raise done.error

    def _signal(self, message: AdapterMessage, error: BaseException | None = None) -> None:
        done = self._done.pop(message, None) if self.is_leader else None
        if done is not None:
            done.error = error
            done.set()

    # ---------------------------------------------------------------- every rank: reading adapters
    def _read_host(self, name: str, path: str, expected_digest: str | None = None) -> adapter_slots.HostAdapter:
        """This rank's copy of an adapter, read from its files (no collective)."""
        c = self.config
        start = time.perf_counter()
        try:
            return adapter_slots.load_host_adapter(
                name, path, self.hf_config, self.info.tp_size, self.info.tp_rank, c.mode, c.max_lora_rank,
                expected_digest=expected_digest,
            )
        finally:
            self.read_times.record(time.perf_counter() - start)

    def _load_agreed(self, name: str, path: str) -> adapter_slots.HostAdapter:
        """The pool's loader, used at registration (re-reads go through the background reader, _collect_reads):
        every rank reads its own copy, then one all-reduce; if any rank failed, or the ranks read different bytes,
        every rank raises AdapterReadError. A registered adapter's bytes must be those it was registered with."""
        reread = name in self.pool.names()
        try:
            host, error = self._read_host(name, path, self.digests.get(name)), None
        except (ValueError, OSError) as err:
            host, error = None, err
            log.warning("TP rank %d: cannot read adapter %r from %s: %s", self.info.tp_rank, name, path, err)
        failed_ranks, same_bytes = self._agree(None if host is None else host.digest)
        refused = self._read_error(name, path, reread, error, failed_ranks, same_bytes)
        if refused is not None:
            raise refused
        self.digests[name] = host.digest
        return host

    @staticmethod
    def _read_error(
        name: str, path: str, reread: bool, error: Exception | None, failed_ranks: list[int], same_bytes: bool = True
    ) -> AdapterReadError | None:
        """The error every rank reports for an adapter read the ranks agreed on (None: read alike everywhere);
        a rank that failed itself says why, the others name the failed ranks."""
        if error is None and failed_ranks:
            error = AdapterReadError(f"TP rank(s) {failed_ranks} could not read it (see their logs)")
        elif error is None and not same_bytes:
            error = AdapterReadError(f"the TP ranks read different bytes from {path} (files changed while read)")
        if error is None:
            return None
        what = "re-read" if reread else "read"
        refused = AdapterReadError(f"adapter {name!r} could not be {what} from {path}: {error}")
        refused.__cause__ = error
        return refused

    def _agree(self, digest: str | None) -> tuple[list[int], bool]:
        """(TP ranks whose read failed, whether the others read the same bytes) from each rank's digest (None:
        failed): one all-reduce(MIN) of [ok per rank, digest bytes, -digest bytes], so min == -max per byte."""
        tp = self.info.tp_size
        byte_values = torch.tensor(list(bytes.fromhex(digest or "00" * 32)), dtype=torch.int64)  # [32]
        flags = self._min_over_ranks(torch.cat([self._ok_per_rank(digest is not None), byte_values, -byte_values]))
        return self._zeros(flags[:tp]), bool((flags[tp : tp + 32] == -flags[tp + 32 :]).all())

    def _ok_per_rank(self, ok: bool) -> torch.Tensor:
        """[tp] ones, this rank's 0 if it failed: after a MIN over the ranks, the zeros are the failed ranks."""
        flags = torch.ones(self.info.tp_size, dtype=torch.int64)
        flags[self.info.tp_rank] = int(ok)
        return flags

    @staticmethod
    def _zeros(flags: torch.Tensor) -> list[int]:
        return [int(r) for r in (flags == 0).nonzero().flatten()]

    def _min_over_ranks(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over the TP ranks: one all-reduce (none at TP=1)."""
        if self.info.tp_size == 1:
            return flags
        flags = flags.to(self.info.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=parallel_state.get_tensor_model_parallel_group())
        return flags.cpu()

    def _read_ahead(self, name: str) -> bool:
        """Whether the adapter can take a slot without a read now; if not, its background read is asked for (once)."""
        if self.pool.cached(name) or name in self.read_ahead:
            return True
        if name not in self.reading:
            self.reading[name] = self.pool.path(name)
            self._reader.submit(_ReadJob(name, self.reading[name], self.digests.get(name)))
        return False

    def _collect_reads(self) -> None:
        """Agree on the background reads every rank has finished: one all-reduce(MIN) of [done, ok per rank] per
        read in flight, in request order (the same on every rank). A read done everywhere gives a host copy for
        its waiting requests, or, if any rank failed, an error for them on every rank."""
        if not self.reading:
            return
        names = list(self.reading)
        results = [self._reader.result(n) for n in names]
        mine = [torch.cat([torch.tensor([int(r is not None)]), self._ok_per_rank(r is None or r.host is not None)])
                for r in results]
        flags = self._min_over_ranks(torch.stack(mine))  # [reads, 1 + tp]
        for name, result, row in zip(names, results, flags):
            if not row[0]:
                continue  # still reading on some rank
            path = self.reading.pop(name)
            self._reader.forget(name)
            refused = self._read_error(name, path, True, result.error, self._zeros(row[1:]))
            if refused is None:
                self.read_ahead[name] = result.host
            else:
                self.read_failures[name] = str(refused)

    # ---------------------------------------------------------------- every rank: one step
    def step(self, wait: bool = False) -> None:
        """One lockstep iteration: agree on the message, apply it, admit, run one engine step, publish."""
        message = self._collect(wait) if self.is_leader else None
        if self.info.tp_size > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        self._apply(message)
        for rid in sorted(self.deferred_aborts):  # the same order on every rank
            if rid in self.adapter_of:
                self._abort_in_engine(rid)
            else:
                self.deferred_aborts.discard(rid)
        self._advance()
        self._retire_unloads()
        self.step_count += 1
        self.last_step_at = time.monotonic()

    def _advance(self) -> None:
        """Agree on finished adapter reads, admit what can start, run one engine step: the same on every rank."""
        self._collect_reads()
        self._admit()
        if self.engine.has_unfinished_requests():
            self._engine_step()

    def _collect(self, wait: bool) -> list[Message]:
        """Rank 0: everything that arrived since the last step (waits up to a heartbeat when idle, a moment when
        only adapter reads are in flight)."""
        items = []
        busy = self.engine.has_unfinished_requests()
        idle = not busy and not self.waiting and not self.unloading
        timeout = HEARTBEAT_S if idle else READ_POLL_S if not busy and self.reading else 0.0
        if wait and timeout:
            try:
                items.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return items

    def _apply(self, messages: list[Message]) -> None:
        for message in messages:
            match message:
                case AddRequest(request) if self.stopping:  # queued behind a Stop: the loop ends after this step
                    self._end_waiting(request, "abort")
                case AddRequest(request):
                    self.waiting.append(request)
                    self.counters["prompt_tokens"] += len(request.prompt_ids)
                case CancelRequest(request_id):
                    self._cancel(request_id, "abort")
                case RegisterAdapter():
                    self._register(message)
                case UnregisterAdapter(name) if name not in self.pool.names() or name in self.unloading:
                    self._signal(message, KeyError(f"adapter {name!r} is not loaded"))  # never unregister it twice
                case UnregisterAdapter(name):
                    self.unloading.append(name)
                case Stop(drain):
                    self._stop(drain=drain)
                case _:
                    raise TypeError(f"unknown serving loop message {message!r}")

    def _register(self, message: RegisterAdapter) -> None:
        """Every rank reads the adapter and must find the bytes rank 0 checked (the pool's loader agrees on it)."""
        err = None
        fresh = message.name not in self.digests  # a taken name keeps its digest (the pool refuses it, unread)
        if fresh:
            self.digests[message.name] = message.digest
        try:
            self.pool.register(message.name, message.path)
        except (ValueError, OSError) as e:  # a taken name, or the files changed since rank 0 read them
            err = e
            if fresh:
                del self.digests[message.name]
        self._signal(message, err)

    def _stop(self, drain: bool) -> None:
        self.stopping = True
        if not drain:
            for rid in list(self.adapter_of) + [r.request_id for r in self.waiting]:
                self._cancel(rid, "abort")
        while self.engine.has_unfinished_requests() or self.waiting:
            self._advance()
            if self.reading and not self.engine.has_unfinished_requests():
                time.sleep(READ_POLL_S)  # only reads left to wait for
            self.last_step_at = time.monotonic()
        self._reader.close()

    def _admit(self) -> None:
        """Move waiting requests into the engine as their adapters get slots (FIFO per adapter; a request whose
        adapter cannot get a slot now, or is being read, waits without blocking requests for cached adapters)."""
        blocked: set[str] = set()
        unreadable, self.read_failures = self.read_failures, {}
        still = deque()
        for req in self.waiting:
            slot = -1
            if req.adapter in unreadable:
                self._end_waiting(req, "error", unreadable[req.adapter])
                continue
            if req.adapter is not None:
                slot = self._slot_for(req.adapter, blocked)
                if slot is None:
                    still.append(req)
                    continue
            p = req.params
            try:
                self.samplers.add(req.request_id, p, p.seed or 0, req.prompt_ids)
            except Exception as err:  # any int seeds a generator; anything else fails this request only
                if req.adapter is not None:
                    self.pool.release(req.adapter)
                self._end_waiting(req, "error", f"cannot seed the sampler with seed={p.seed!r}: {err}")
                continue
            if p.prompt_logprobs is not None:
                self.prompt_scores.add(req.request_id, req.prompt_ids, p.prompt_logprobs)
            sp = SamplingParams(
                num_tokens_to_generate=max(p.max_tokens, 1),  # max_tokens 0 (scoring): one token, never shown
                termination_id=-1 if p.ignore_eos else self.eos_id,
                top_k=1,
            )
            sp.add_attributes({"lora_slot": slot})
            self.adapter_of[req.request_id] = req.adapter
            self.engine.add_request(req.request_id, list(req.prompt_ids), sp)
        self.waiting = still
        wanted = {r.adapter for r in still}
        self.read_ahead = {n: h for n, h in self.read_ahead.items() if n in wanted}  # their requests were cancelled
        self.counters["steps_waiting_for_adapter"] += any(a in self.reading for a in wanted)

    def _slot_for(self, name: str, blocked: set[str]) -> int | None:
        """A slot pinned for the adapter, or None (added to `blocked`) while no slot is free or it is being read."""
        slot = None
        if name not in blocked and self._read_ahead(name):
            slot = self.pool.acquire(name, host=self.read_ahead.get(name))
        if slot is None:
            blocked.add(name)
        else:
            self.read_ahead.pop(name, None)  # in the pool's host cache now
        return slot

    def _engine_step(self) -> None:
        if self.count_collectives:
            with count_collectives() as counts:
                result = self.engine.step_modern()
            self.step_collectives = counts
        else:
            result = self.engine.step_modern()
        finished = {rec.request_id: rec for rec in result["finished_request_records"]}
        for rid, why in sorted(self.samplers.take_failures().items()):  # the same on every rank
            self._fail(rid, why, in_engine=rid not in finished)
        if self.is_leader:
            for rid in result["active_request_ids"]:
                self._publish(rid, self._tokens(self.engine.requests[rid].record), None)
        for rid, rec in finished.items():
            tokens = self._tokens(rec)
            if self.is_leader:
                self._publish(rid, tokens, rec)
            self._release(rid)

    @staticmethod
    def _tokens(record: Any) -> list[int]:
        """All tokens generated so far across evictions (each checkpoint starts a new request in the record)."""
        return [int(t) for r in record.requests for t in r.generated_tokens]

    def _release(self, rid: int) -> None:
        adapter = self.adapter_of.pop(rid, None)
        self.samplers.remove(rid)
        self.prompt_scores.remove(rid)
        if adapter is not None:
            self.pool.release(adapter)
        self.counters["finished"] += 1

    def _cancel(self, rid: int, reason: str) -> None:
        """Remove a request wherever it is; the same on every rank."""
        for req in list(self.waiting):
            if req.request_id == rid:
                self.waiting.remove(req)
                self._end_waiting(req, reason)
                return
        if rid in self.adapter_of:
            self._abort_in_engine(rid)
        if self.is_leader and rid in self._live:
            self._finish(self._live[rid], reason)

    def _end_waiting(self, req: GenerationRequest, reason: str, error: str | None = None) -> None:
        """A request that never entered the engine is finished (it is out of `waiting` already)."""
        self.counters["finished"] += 1
        self.counters["failed"] += error is not None
        if self.is_leader and req.request_id in self._live:
            self._finish(self._live[req.request_id], reason, error)

    def _fail(self, rid: int, error: str, in_engine: bool) -> None:
        """End one request with an error (the others go on): its caller is told, the engine drops it."""
        self.counters["failed"] += 1
        self.samplers.remove(rid)
        self.prompt_scores.remove(rid)
        if in_engine:
            self._abort_in_engine(rid)
        if self.is_leader and rid in self._live:
            self._finish(self._live[rid], "error", error)

    def _abort_in_engine(self, rid: int) -> None:
        """Finish a request early: out of the engine's queue, or its length cap lowered so it ends next step.

        A request in the middle of a chunked prefill cannot finish (megatron keeps it active until its last
        chunk): its abort is retried each step until the prefill is done.
        """
        engine, ctx = self.engine, self.engine.context
        if rid == ctx.chunked_prefill_request_id:
            self.deferred_aborts.add(rid)
            return
        self.deferred_aborts.discard(rid)
        if rid in engine.waiting_request_ids:
            engine.waiting_request_ids.remove(rid)
            engine.requests.pop(rid, None)
            self._release(rid)
            return
        idx = (ctx.request_ids[: ctx.total_request_count] == rid).nonzero()
        if len(idx):
            ctx.request_output_lengths[idx[0, 0]] = 0  # length >= cap: finished at the next bookkeeping

    def _retire_unloads(self) -> None:
        for name in list(self.unloading):
            idle = self.pool.pinned(name) == 0 and name not in self.reading
            if idle and all(r.adapter != name for r in self.waiting):
                self.read_ahead.pop(name, None)
                self.pool.unregister(name)
                self.digests.pop(name, None)
                self.unloading.remove(name)
                self._signal(UnregisterAdapter(name))

    # ---------------------------------------------------------------- rank 0: events to the requests' queues
    def _set_step_slots(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: per-token adapter slots of this step, grouped once for every LoRA layer."""
        ctx = kwargs.get("inference_context") or self.engine.context  # (no engine yet while it captures graphs)
        input_ids = args[0] if args else kwargs["input_ids"]  # [1, padded tokens]
        n, padded = ctx.active_token_count, input_ids.shape[-1]
        slots = ctx.request_metadata["lora_slot"][ctx.token_to_request_idx[:n].long()]  # [n]
        if padded > n:
            slots = torch.cat([slots, slots.new_full((padded - n,), -1)])
        if self._slot_buffers is None or self._slot_buffers.order.numel() < padded:
            size = max(padded, self.max_step_tokens)
            self._slot_buffers = SlotBatch.buffers(size, self.config.max_loras, slots.device)
        batch = SlotBatch.from_slot_ids(slots, self.config.max_loras, self._slot_buffers)  # fixed addresses
        for layer in self._lora_layers:
            layer.set_lora_slots(batch)

    def _publish(self, rid: int, tokens: list[int], record: Any) -> None:
        """Send the new visible tokens (with their log-probabilities if asked) and text of a request; apply stop ids,
        stop strings and the finish."""
        live = self._live.get(rid)
        if live is None or live.done:
            return
        p = live.request.params
        finish = None
        if p.max_tokens == 0:  # scoring a prompt: the one token the engine computed is not shown
            tokens = []
        for i in range(len(live.tokens), len(tokens)):
            tok = tokens[i]
            if tok in p.stop_token_ids or (tok == self.eos_id and not p.ignore_eos):
                tokens, finish = tokens[:i], "stop"
                break
        new = tokens[len(live.tokens) :]
        logprobs = tuple(self.samplers.token_logprobs(rid)[len(live.tokens) : len(tokens)])
        self.counters["generated_tokens"] += len(new)
        live.tokens = tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=p.skip_special_tokens)
        cut = self._stop_string_cut(live, text)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if finish is None and record is not None:
            finish = "length"
        if finish is None:  # hold back what could still become a stop string or a multi-byte character
            hold = 0 if p.include_stop_str_in_output else max((len(s) - 1 for s in p.stop), default=0)
            shown = text[: len(text) - hold] if hold else text
            shown = shown.rstrip("\ufffd")
            if len(shown) > len(live.text) or new:
                live.events.put(self._event(live, tuple(new), shown[len(live.text) :], logprobs=logprobs))
                live.text = max(shown, live.text, key=len)
            return
        live.events.put(self._event(live, tuple(new), text[len(live.text) :], finish, logprobs=logprobs))
        live.text, live.done = text, True
        self._live.pop(rid, None)
        if record is None:  # stopped by us before the engine finished it: free its engine slot too
            self._inbox.put(CancelRequest(rid))

    def _stop_string_cut(self, live: _Live, text: str) -> int:
        """Where the text ends at its earliest stop string (after the string with include_stop_str_in_output), or -1.

        As vLLM: no stop string is matched before min_tokens tokens, nor one ending within their text."""
        p = live.request.params
        if not p.stop or len(live.tokens) <= p.min_tokens:
            return -1
        if live.stop_from is None:
            prefix = live.tokens[: p.min_tokens]
            live.stop_from = len(self.tokenizer.decode(prefix, skip_special_tokens=p.skip_special_tokens))
        found = [(i, s) for s in p.stop if s and (i := text.find(s, max(0, live.stop_from - len(s) + 1))) >= 0]
        if not found:
            return -1
        at, stop = min(found, key=lambda f: f[0])
        return at + len(stop) if p.include_stop_str_in_output else at

    def _event(
        self, live: _Live, tokens: tuple[int, ...], text: str, finish: str | None = None, error: str | None = None,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> TokenEvent:
        first, live.sent = not live.sent, True
        return TokenEvent(
            live.request.request_id, tokens, text, finish is not None, finish, error,
            len(live.request.prompt_ids), len(live.tokens), logprobs,
            self.prompt_scores.take(live.request.request_id) if first else None,
        )

    def _finish(self, live: _Live, reason: str, error: str | None = None) -> None:
        if live.done:
            return
        live.done = True
        live.events.put(self._event(live, (), "", reason, error))
        self._live.pop(live.request.request_id, None)
