"""Starting a parallel run and keeping its ranks in lockstep.

Rank 0 is the process that serves (LLM(...) or `selfseek serve`): it runs the scheduler and the engine as with one
process, and its model is a `LeaderLM`: every top-level model call (new_kv_pools, hidden_states, logits, forward)
is first broadcast to the other ranks, which make the same call on their shard of the model (`follow`), so the
collectives inside the layers meet. Workers keep their own KV pools, indexed by the block tables rank 0 sends,
and the last hidden states (`Made`: later commands name them instead of sending them). Speculative decoding's MTP
calls (the MTP module is sharded like a decoder layer) and the prefix cache's disk tier (each rank its own files,
lockstep_disk.py) are lockstep commands too.
With data-parallel attention the step is one call, forward_ranks, carrying each rank's own batch
(data_parallel.py).

Where the ranks come from:
- one machine: rank 0 spawns ranks 1..W-1 itself (`load_parallel`);
- several machines: each node runs `selfseek serve ... --nnodes N --node-rank R --master-addr HOST --master-port P`
  and spawns its W/N local ranks; node 0's first one serves HTTP (`run_node` on the others);
- torchrun: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT name one rank per process.

Faults: every compute collective is bounded by the timeout (comm.py); a failure on rank 0 marks the group broken,
names the rank (a local child's exit code, else the ranks missing from a monitored barrier), runs the failure
handler (the server: unhealthy, then exit 1) and every later call raises EngineDead at once. A watchdog thread
notices a local worker that dies while the server is idle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from selfseek.distributed import comm as comm_mod
from selfseek.distributed.data_parallel import DataParallel, check_data_parallel_engine_args, forward_ranks
from selfseek.distributed.lockstep_disk import DISK_CALLS, LockstepDiskCache
from selfseek.distributed.parallel import Layout, Sharding
from selfseek.engine.errors import EngineDead
from selfseek.engine.speculative import MTP_CALLS
from selfseek.models.model import CausalLM

log = logging.getLogger("selfseek.distributed")


@dataclass
class LaunchSpec:
    """Everything a rank needs to join the run and load its shard (picklable: sent to spawned workers)."""

    layout: Layout
    source: str | None
    dtype: str = "float32"
    device: str = "cpu"
    quantize: int | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    node_rank: int = 0
    timeout_s: float | None = None
    env: dict = field(default_factory=dict)  # SELFSEEK_* settings the workers inherit
    torchrun: bool = False  # every rank started by torchrun: join through its store (env://)

    @property
    def per_node(self) -> int:
        return self.layout.world // self.layout.nnodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict | None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT when started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "master_addr": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": int(os.environ.get("MASTER_PORT", "29500"))}


def _device_for(spec: LaunchSpec, local_rank: int) -> torch.device:
    if spec.device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank needs cuda:{local_rank}; this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(spec.device)


def _load_shard(spec: LaunchSpec, rank: int, device: torch.device, progress: bool, generation_config="auto"):
    from selfseek.weights import load_model, resolve_source

    path = resolve_source(spec.source)  # a safetensors folder or a GGUF file: each reads only this rank's slices
    return load_model(str(path), spec.dtype, device, progress, spec.quantize, generation_config,
                      shard=Sharding(spec.layout, rank))


@dataclass(frozen=True)
class _Ref:
    """In a command: what an earlier command made (`Made.items[index]`, element `item` of it when a list), which
    every rank keeps its own copy of."""

    index: int
    item: int | None = None


class Made:
    """What earlier commands made, kept alike on every rank and named by _Ref in later commands instead of being
    sent: the KV pools (for the whole run) and, once there is an MTP pool (speculative decoding), the last hidden
    states (the MTP pass after sampling reads them again)."""

    KEEP = ("new_kv_pools", "new_mtp_pool")
    RECENT = ("hidden_states",)
    RECENT_KEPT = 1  # one forward per engine step

    def __init__(self):
        self.items: dict[int, object] = {}
        self.count = 0
        self.recent: deque[int] = deque()
        self.drafting = False  # every rank sees the same commands: the same decision everywhere

    def record(self, name: str, out: object) -> None:
        self.drafting |= name == "new_mtp_pool"
        if name not in self.KEEP and not (name in self.RECENT and self.drafting):
            return
        self.items[self.count] = out
        if name in self.RECENT:
            self.recent.append(self.count)
            if len(self.recent) > self.RECENT_KEPT:
                del self.items[self.recent.popleft()]
        self.count += 1

    def _find(self, obj: object) -> _Ref | None:
        for i, made in self.items.items():
            if made is obj:
                return _Ref(i)
            if isinstance(made, list) and isinstance(obj, torch.Tensor):
                for j, t in enumerate(made):
                    if t is obj:
                        return _Ref(i, j)
        return None

    def to_refs(self, args: tuple) -> tuple:
        """Rank 0's arguments with what the ranks already hold replaced by _Ref; a list of tensors must be (of) KV
        pools."""
        out = []
        for a in args:
            ref = self._find(a) if isinstance(a, list | torch.Tensor) else None
            if ref is None and isinstance(a, list) and a and all(isinstance(t, torch.Tensor) for t in a):
                refs = [self._find(t) for t in a]
                if any(r is None for r in refs):
                    raise ValueError("a parallel model runs only on the KV pools it made (new_kv_pools)")
                ref = refs
            out.append(a if ref is None else ref)
        return tuple(out)

    def resolve(self, args: tuple) -> tuple:
        """A received command's arguments with each _Ref replaced by this rank's own object."""
        def one(a):
            if isinstance(a, list) and a and all(isinstance(r, _Ref) for r in a):
                return [one(r) for r in a]
            if not isinstance(a, _Ref):
                return a
            made = self.items[a.index]
            return made if a.item is None else made[a.item]
        return tuple(one(a) for a in args)


# ---- rank 0 -------------------------------------------------------------------------------------------------
class Lockstep:
    """Rank 0's side of the lockstep: broadcasts each model call, tracks the group's health."""

    def __init__(self, comm: comm_mod.Comm, workers: list, spec: LaunchSpec,
                 on_failure: Callable[[str], None] | None = None):
        self.comm, self.workers, self.spec = comm, workers, spec  # workers: (rank, _Worker) started here
        self.on_failure = on_failure
        self.made = Made()
        self.broken: str | None = None
        self.depth = 0
        self.lock = threading.Lock()
        self.closed = False
        self._watchdog = threading.Thread(target=self._watch, name="selfseek-rank-watchdog", daemon=True)
        self._watchdog.start()

    def call(self, model: CausalLM, name: str, *args):
        base = _command(name)
        if self.depth:  # a call made inside another (forward -> hidden_states): the workers make it too
            return base(model, *args)
        with self.lock:
            if self.broken:
                raise EngineDead(self.broken)
            sent = self.made.to_refs(args)
            self.depth += 1
            try:
                self.comm.broadcast_command((name, sent))
                out = base(model, *args)
            except Exception as e:
                raise EngineDead(self.fail(e)) from e
            finally:
                self.depth -= 1
            self.made.record(name, out)
            return out

    def fail(self, error: BaseException | str) -> str:
        """Mark the group broken: -> a message naming the rank at fault where it can be found."""
        if self.broken:
            return self.broken
        dead = self._dead_workers(wait_s=1.0 if isinstance(error, comm_mod.RankFailure) else 0.0)
        if dead:
            who = "; ".join(dead)
        elif isinstance(error, BaseException) and not isinstance(error, comm_mod.RankFailure):
            who = f"rank 0 raised {type(error).__name__}"  # its own fault: the others wait in a collective
        else:
            who = self.comm.missing_ranks()
        self.broken = f"parallel group broken: {who} ({error})"
        log.critical("%s", self.broken, exc_info=error if isinstance(error, BaseException) else None)
        if self.on_failure is not None:
            try:
                self.on_failure(self.broken)
            except Exception:  # noqa: BLE001 - a failing handler must not hide the failure
                log.exception("the failure handler raised")
        return self.broken

    def _dead_workers(self, wait_s: float = 0.0) -> list[str]:
        end = time.monotonic() + wait_s
        while True:
            dead = [f"rank {r} exited with code {p.exitcode}" for r, p in self.workers if p.exitcode is not None]
            if dead or time.monotonic() >= end:
                return dead
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self.closed and not self.broken:
            dead = self._dead_workers()
            if dead and not self.closed:
                self.fail("a worker process ended")
                return
            time.sleep(0.2)

    def close(self) -> None:
        """Tell the workers to stop, wait for them, leave the group."""
        if self.closed:
            return
        self.closed = True
        if not self.broken:
            try:
                with self.lock:
                    self.comm.broadcast_command(("stop", ()))
            except Exception:  # noqa: BLE001 - stopping a broken group
                pass
        for _, p in self.workers:
            p.join(timeout=10)
            p.terminate()
        comm_mod.shutdown()


class LeaderLM(CausalLM):
    """Rank 0's model: the engine's calls, made on every rank at once (see Lockstep)."""

    def new_kv_pools(self, num_slots: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return self.lockstep.call(self, "new_kv_pools", num_slots, dtype)

    def hidden_states(self, tokens, batch=None, pools=None) -> torch.Tensor:
        return self.lockstep.call(self, "hidden_states", tokens, batch, pools)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lockstep.call(self, "logits", hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lockstep.call(self, "forward", tokens)

    def forward_ranks(self, work: tuple, pools: list[torch.Tensor]) -> torch.Tensor:
        """A data-parallel step: each rank its own batch (data_parallel.forward_ranks)."""
        return self.lockstep.call(self, "forward_ranks", work, pools)

    # speculative decoding (engine/speculative.py): the MTP module, sharded like a decoder layer
    def new_mtp_pool(self, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
        return self.lockstep.call(self, "new_mtp_pool", num_slots, dtype)

    def mtp_hidden(self, hidden, next_tokens, batch, pool=None) -> torch.Tensor:
        return self.lockstep.call(self, "mtp_hidden", hidden, next_tokens, batch, pool)

    def mtp_chain(self, hidden, tokens, batch, pool) -> torch.Tensor:
        return self.lockstep.call(self, "mtp_chain", hidden, tokens, batch, pool)

    def draft_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lockstep.call(self, "draft_logits", x)

    def mtp_logits(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        return self.lockstep.call(self, "mtp_logits", hidden, next_tokens)

    def open_disk_cache(self, directory, max_bytes: int, fingerprint: str, block_size: int,
                        pools: list[torch.Tensor], defer_writes: bool = False) -> LockstepDiskCache:
        """The prefix cache's disk tier: each rank its own shard's files (distributed/lockstep_disk.py)."""
        return LockstepDiskCache(self, directory, max_bytes, fingerprint, block_size, pools, defer_writes)


_COMMANDS = {"forward_ranks": forward_ranks, **MTP_CALLS, **DISK_CALLS}


def _command(name: str):
    """The function a lockstep command names: a CausalLM method, forward_ranks (data-parallel steps), an MTP
    drafting call (engine/speculative.py) or a disk-tier call (lockstep_disk.py)."""
    return _COMMANDS.get(name) or getattr(CausalLM, name)


def load_parallel(source, dtype: str = "float32", device: str | torch.device = "cpu", progress: bool = True,
                  quantize: int | None = None, generation_config="auto", tensor_parallel_size: int = 1,
                  expert_parallel_size: int = 1, data_parallel_size: int = 1, nnodes: int = 1, node_rank: int = 0,
                  master_addr: str = "127.0.0.1", master_port: int | None = None, timeout_s: float | None = None,
                  on_failure: Callable[[str], None] | None = None):
    """Rank 0 of a parallel run: start this node's other ranks, join the group, load this rank's shard.
    -> (model, tokenizer) as weights.load_model, the model a LeaderLM (close it with `close_parallel`)."""
    layout = Layout(tensor_parallel_size, expert_parallel_size, data_parallel_size, nnodes)
    layout.check()
    if node_rank != 0:
        raise ValueError("load_parallel runs on node 0; other nodes run `run_node`")
    if nnodes > 1 and not master_port and torchrun_env() is None:
        raise ValueError("--nnodes > 1 needs --master-addr and --master-port: the rendezvous every node joins")
    spec = LaunchSpec(layout, None if source is None else str(source), str(dtype).removeprefix("torch."),
                      str(torch.device(device)), quantize, master_addr, master_port or free_port(), 0, timeout_s,
                      {k: v for k, v in os.environ.items() if k.startswith("SELFSEEK_")})
    env = torchrun_env()
    if env is not None:  # torchrun started every rank: this is rank 0, nothing to spawn
        if env["rank"] != 0 or env["world"] != layout.world:
            raise ValueError(f"torchrun started rank {env['rank']} of {env['world']}; the layout needs "
                             f"{layout.world} ranks with rank 0 serving")
        spec.master_addr, spec.master_port, spec.torchrun = env["master_addr"], env["master_port"], True
        workers = []
    else:
        workers = _spawn(spec, range(1, spec.per_node))
    return _join_as_leader(spec, workers, progress, generation_config, on_failure)


def check_engine_args(engine_args: dict, data_parallel_size: int = 1) -> None:
    """Engine features refused on a parallel model of this layout, before any rank starts (DataParallel refuses
    them again when the engine is built)."""
    if data_parallel_size > 1:
        check_data_parallel_engine_args(engine_args)


def reload_parallel(model: CausalLM, source, dtype: str = "float32", quantize: int | None = None,
                    layout: Layout | None = None, progress: bool = False, generation_config="auto"):
    """Load another checkpoint on a running group (the same processes; a layout of the same world size): its
    ranks drop their shard of `model` and load the new one. -> (model, tokenizer); `model` is unusable after."""
    lockstep: Lockstep = model.lockstep
    layout = layout or lockstep.spec.layout
    layout.check()
    if layout.world != lockstep.spec.layout.world:
        raise ValueError(f"layout needs {layout.world} ranks; the group has {lockstep.spec.layout.world}")
    spec = dataclasses.replace(lockstep.spec, layout=layout, source=str(source),
                               dtype=str(dtype).removeprefix("torch."), quantize=quantize)
    lockstep.spec = spec
    with lockstep.lock:
        if lockstep.broken:
            raise EngineDead(lockstep.broken)
        lockstep.comm.broadcast_command(("load", (spec,)))
        lockstep.made = Made()
        new, tokenizer = _load_shard(spec, 0, lockstep.comm.device, progress, generation_config)
    _lead(new, lockstep)
    del model.lockstep
    return new, tokenizer


def _lead(model: CausalLM, lockstep: Lockstep) -> None:
    model.__class__ = LeaderLM
    model.lockstep = lockstep
    dp = lockstep.spec.layout.dp
    model.data_parallel = DataParallel(dp) if dp > 1 else None  # LLMEngine takes its per-rank parts from it


def _join_as_leader(spec: LaunchSpec, workers: list, progress: bool, generation_config, on_failure):
    try:
        device = _device_for(spec, 0)
        comm = comm_mod.init(0, spec.layout.world, spec.master_addr, spec.master_port, device, spec.timeout_s,
                             "env://" if spec.torchrun else None)
        model, tokenizer = _load_shard(spec, 0, device, progress, generation_config)
    except BaseException:
        for _, p in workers:
            p.terminate()
        comm_mod.shutdown()
        raise
    lockstep = Lockstep(comm, workers, spec, on_failure)
    _lead(model, lockstep)
    weakref.finalize(lockstep, lockstep.close)
    return model, tokenizer


def close_parallel(model: CausalLM) -> None:
    """Stop a parallel model's workers and leave the group (also done when the model is garbage collected)."""
    lockstep = getattr(model, "lockstep", None)
    if lockstep is not None:
        lockstep.close()


class _Worker:
    """A rank this process started: a fresh interpreter (`python -c`), so the caller's script is never
    re-imported (as multiprocessing's spawn would) and needs no __main__ guard."""

    def __init__(self, spec: LaunchSpec, rank: int, local_rank: int):
        code = "from selfseek.distributed.launch import worker_main; worker_main()"
        env = {**os.environ, **spec.env}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, env=env)
        self.proc.stdin.write(pickle.dumps((spec, rank, local_rank)))
        self.proc.stdin.close()

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _spawn(spec: LaunchSpec, local_ranks) -> list[tuple[int, _Worker]]:
    return [(spec.node_rank * spec.per_node + local, _Worker(spec, spec.node_rank * spec.per_node + local, local))
            for local in local_ranks]


# ---- the other ranks ----------------------------------------------------------------------------------------
def worker_main() -> None:
    """A spawned rank's process (its LaunchSpec, rank and local rank pickled on stdin): exits 0 when rank 0 says
    stop, 1 when the group fails."""
    spec, rank, local_rank = pickle.loads(sys.stdin.buffer.read())
    sys.exit(run_worker(spec, rank, local_rank))


def run_worker(spec: LaunchSpec, rank: int, local_rank: int) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    device = _device_for(spec, local_rank)
    comm = comm_mod.init(rank, spec.layout.world, spec.master_addr, spec.master_port, device, spec.timeout_s,
                         "env://" if spec.torchrun else None)
    try:
        while spec is not None:  # a "load" command gives the next checkpoint (reload_parallel)
            model, _ = _load_shard(spec, rank, device, progress=False)
            spec = follow(model, comm)
            del model
        return 0
    except comm_mod.RankFailure as e:
        log.error("rank %d: the group failed: %s", rank, e)
        comm.missing_ranks()
        return 1
    finally:
        comm_mod.shutdown()


@torch.inference_mode()
def follow(model: CausalLM, comm: comm_mod.Comm) -> LaunchSpec | None:
    """Make rank 0's model calls on this rank's shard until it says stop (-> None) or load (-> the new spec)."""
    made = Made()
    while True:
        name, args = comm.broadcast_command(None)
        if name == "stop":
            return None
        if name == "load":
            return args[0]
        args = _localize(made.resolve(args), comm.device)
        made.record(name, _command(name)(model, *args))


def _localize(obj, device: torch.device):
    """Rank 0's device tensors in a received command (its batch dataclasses included) moved to this rank's device;
    CPU tensors (block tables, row offsets) stay on the CPU, as the attention backend expects."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" or obj.device == device else obj.to(device)
    if isinstance(obj, list | tuple):
        return type(obj)(_localize(o, device) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):  # a fresh unpickled copy: changed in place
            object.__setattr__(obj, f.name, _localize(getattr(obj, f.name), device))
    return obj


def run_node(spec: LaunchSpec) -> int:
    """A node other than node 0 (`--node-rank R`): spawn its other local ranks, be its first one. -> exit code."""
    workers = _spawn(spec, range(1, spec.per_node))
    code = run_worker(spec, spec.node_rank * spec.per_node, 0)
    for _, p in workers:
        p.join()
        code = code or (p.exitcode or 0)
    return code


def run_torchrun_worker(spec: LaunchSpec, env: dict) -> int:
    """A non-zero rank started by torchrun: follow rank 0. -> exit code."""
    spec.master_addr, spec.master_port, spec.torchrun = env["master_addr"], env["master_port"], True
    return run_worker(spec, env["rank"], env["local_rank"])


# ---- `selfseek serve` ---------------------------------------------------------------------------------------
def parallel_options(args) -> dict | None:
    """load_parallel's keywords from `selfseek serve`'s flags, or None for a one-process run."""
    opts = {"tensor_parallel_size": getattr(args, "tensor_parallel_size", 1) or 1,
            "expert_parallel_size": getattr(args, "expert_parallel_size", 1) or 1,
            "data_parallel_size": getattr(args, "data_parallel_size", 1) or 1,
            "nnodes": getattr(args, "nnodes", 1) or 1, "node_rank": getattr(args, "node_rank", 0) or 0,
            "master_addr": getattr(args, "master_addr", None) or "127.0.0.1",
            "master_port": getattr(args, "master_port", None), "timeout_s": getattr(args, "distributed_timeout", None)}
    if Layout(opts["tensor_parallel_size"], opts["expert_parallel_size"], opts["data_parallel_size"]).world == 1:
        return None
    return opts


def run_if_not_leader(args, opts: dict) -> int | None:
    """On a rank that does not serve HTTP (another node's, or a torchrun rank > 0): be that rank until the run
    ends -> its exit code. None on the rank that serves."""
    env = torchrun_env()
    layout = Layout(opts["tensor_parallel_size"], opts["expert_parallel_size"], opts["data_parallel_size"],
                    opts["nnodes"])
    layout.check()
    spec = LaunchSpec(layout, args.model, _dtype_name(args.dtype), args.device or _default_device(), None,
                      opts["master_addr"], opts["master_port"] or 29500, opts["node_rank"], opts["timeout_s"])
    if env is not None and env["rank"] != 0:
        return run_torchrun_worker(spec, env)
    if env is None and opts["node_rank"] > 0:
        if not opts["master_port"]:
            raise ValueError("--node-rank > 0 needs --master-addr and --master-port (node 0's)")
        return run_node(spec)
    return None


def _dtype_name(dtype: str | None) -> str:
    """--dtype as every rank resolves it ("auto": the checkpoint's 16-bit storage, computed as on one process)."""
    return dtype or "auto"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def stop_server_on_failure(model: CausalLM, engine) -> None:
    """When the group breaks: the engine reports dead (/health 503, requests end with EngineDead), and the
    process is asked to stop (SIGTERM: uvicorn drains, `server_exit_code` then says 1)."""
    import signal

    def on_failure(message: str) -> None:
        die = getattr(engine, "_die", None)
        if die is not None:
            die(EngineDead(message))
        print(f"selfseek: {message}; stopping", file=sys.stderr, flush=True)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()

    model.lockstep.on_failure = on_failure
    if model.lockstep.broken:
        on_failure(model.lockstep.broken)


def server_exit_code(model: CausalLM) -> int:
    """1 when the model's parallel group broke (a rank died or hung), else 0; closes the group."""
    lockstep = getattr(model, "lockstep", None)
    if lockstep is None:
        return 0
    code = 1 if lockstep.broken else 0
    lockstep.close()
    return code
