"""A prompt's KV pages from one process's pool into another's: NIXL, gRPC, and the copy limit.

Process A (the prefill side) holds a KV pool shaped like the engines' (a `PageLayout` over
`2 * layers` buffers `[pages * page_size, kv_heads, head_dim]`, random data), process B (the
decode side) an empty one. For each request size, in one run:

    nixl       A's `NixlAgent.write` of the pages of every buffer into B's pool with a notif:
               `done` until A sees DONE, `notif` until B took the notification (B polls)
    grpc       the services' code: A `read_pages`, `send_kv` to a gRPC server in B whose
               WriteKv (`serve_write_kv`) runs `receive_kv` and `write_pages`
    copy-ipc   the physical limit: A copies the same bytes straight into B's pool (CPU: B's
               pool is in shared memory; CUDA: B's buffers reach A as CUDA IPC handles)
    copy-local the same copy inside A, into a scratch buffer as large (memcpy / device-to-device)

Each row is the median of `--reps` after a warm-up; B's pages are checked against A's after
every transport (a digest of the moved pages; B's are zeroed before each transport). The copy
rows move pages 1..n on both sides, contiguous: the bandwidth bound whatever the page list.

    python bench/kv_transfer.py                                  # Llama-3-8B shape, CPU
    python bench/kv_transfer.py --device cuda --json out.json
    python bench/kv_transfer.py --variants "default; UCX_TLS=tcp; UCX_TLS=cma,tcp; pt"

`--variants` re-runs the NIXL part in fresh process pairs: each variant is a list of
`UCX_*=value` settings and `pt` (NIXL's progress thread on), `default` for none; the first
variant is the main run. Every `UCX_*` variable of the caller's environment passes through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kv_stream import KV_CHUNK_BYTES, receive_kv, send_kv, serve_write_kv
from services.protos.tandem.worker.v1 import worker_pb2
from shared.transfer import KvCommit, import_nixl
from shared.transfer.nixl import NixlAgent
from shared.transfer.pages import PageLayout, page_runs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SERVER_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]  # as services/worker/server.py


@dataclass(frozen=True)
class Spec:
    layers: int
    kv_heads: int
    head_dim: int
    page_size: int
    dtype: str
    device: str
    tokens: list[int]
    reps: int
    warmup: int
    fragmented: bool
    chunk_bytes: int
    pool_pages: int  # pages per pool, page 0 included
    transports: list[str]
    threads: int = 0  # torch threads in A and B (0: torch's default)
    seed: int = 0

    def plan(self, tokens: int) -> tuple[list[int], list[int]]:
        """(A's pages, B's pages) for a request of `tokens` tokens."""
        n = tokens // self.page_size
        if not self.fragmented:
            return list(range(1, n + 1)), list(range(1, n + 1))
        gen = torch.Generator().manual_seed(self.seed + tokens)
        src = (torch.randperm(self.pool_pages - 1, generator=gen)[:n] + 1).tolist()
        dst = (torch.randperm(self.pool_pages - 1, generator=gen)[:n] + 1).tolist()
        return src, dst


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    progress_thread: bool = False

    @staticmethod
    def parse(text: str) -> Variant:
        env, pt = {}, False
        for token in text.split():
            if token == "pt":
                pt = True
            elif token != "default":
                key, sep, value = token.partition("=")
                if not sep or not key.startswith("UCX_"):
                    raise SystemExit(f"--variants: {token!r} is neither UCX_*=value, pt nor default")
                env[key] = value
        return Variant(" ".join(text.split()) or "default", env, pt)


# ---- the pools ---------------------------------------------------------------------------------


def make_pool(spec: Spec, fill: bool, shared: bool) -> list[torch.Tensor]:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    # 2 * layers buffers [slots, kv_heads, head_dim], like MHAKVPool.buffers()
    shape = (spec.pool_pages * spec.page_size, spec.kv_heads, spec.head_dim)
    gen = torch.Generator(device=spec.device).manual_seed(spec.seed)
    buffers = []
    for _ in range(2 * spec.layers):
        buf = torch.empty(shape, dtype=DTYPES[spec.dtype], device=spec.device)
        if fill:
            buf.normal_(generator=gen)
        else:
            buf.zero_()
        buffers.append(buf.share_memory_() if shared and spec.device == "cpu" else buf)
    return buffers


def digest(layout: PageLayout, pages: list[int]) -> str:
    return hashlib.blake2b(layout.read_pages(pages), digest_size=16).hexdigest()


def clear(layout: PageLayout, pages: list[int]) -> None:
    idx = torch.tensor(pages, dtype=torch.int64, device=layout.buffers[0].device)
    for buf in layout.buffers:
        view = buf.view(layout.num_pages, layout.page_size, *buf.shape[1:])
        view.index_fill_(0, idx, 0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- process B: the receiving pool -------------------------------------------------------------


class WriteKvServer:
    """A gRPC server whose WriteKv is the decode worker's: receive_kv, then the pages go into
    the pool (here straight into it; a worker hands them to its engine). It runs on the main
    thread's event loop, as in a worker: glibc serves a thread's large blocks from fresh
    mappings, which cost this path ~40% more here."""

    def __init__(self, layout: PageLayout) -> None:
        self.layout = layout
        self.pages: dict[str, list[int]] = {}  # rid -> B's pages
        self.times: dict[str, tuple[float, float]] = {}  # rid -> (received, written)
        self.server = grpc.aio.server(options=_SERVER_OPTIONS)
        serve_write_kv(self.server, self.write_kv)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def write_kv(self, messages: Any, context: grpc.aio.ServicerContext) -> worker_pb2.WriteKvResponse:
        commit, payload = await receive_kv(messages)
        received = time.perf_counter()
        rid = KvCommit.decode(commit).rid
        self.layout.write_pages(self.pages[rid], payload)
        sync(self.layout.buffers[0].device.type)
        self.times[rid] = (received, time.perf_counter())
        return worker_pb2.WriteKvResponse()


def run_b(spec: Spec, variant: Variant, conn: Any) -> None:
    asyncio.run(_serve_b(spec, variant, conn))


async def _serve_b(spec: Spec, variant: Variant, conn: Any) -> None:
    """B's commands from A arrive on the event loop that also serves gRPC (one at a time)."""
    layout = PageLayout(make_pool(spec, fill=False, shared="copy" in spec.transports), spec.page_size)
    agent = (
        NixlAgent(layout, "decode", progress_thread=variant.progress_thread)
        if "nixl" in spec.transports
        else None
    )
    server = WriteKvServer(layout) if "grpc" in spec.transports else None
    if server is not None:
        await server.server.start()
    shared = layout.buffers if "copy" in spec.transports else None
    conn.send((agent.metadata() if agent else None, server.port if server else 0, shared))
    stopped = asyncio.Event()

    def on_command() -> None:
        cmd, *args = conn.recv()
        if cmd == "stop":
            stopped.set()
        elif cmd == "clear":
            clear(layout, args[0])
            sync(spec.device)
            conn.send("ok")
        elif cmd == "digest":
            conn.send(digest(layout, args[0]))
        elif cmd == "notif":  # spin until the tagged notification arrives
            assert agent is not None
            conn.send("armed")
            tag, got = args[0], False
            while not got:
                got = tag in agent.take_notifs()
            conn.send(time.perf_counter())
        elif cmd == "expect":
            assert server is not None
            server.pages[args[0]] = args[1]
            conn.send("ok")
        elif cmd == "times":
            assert server is not None
            conn.send(server.times.pop(args[0]))

    asyncio.get_running_loop().add_reader(conn.fileno(), on_command)
    await stopped.wait()
    if server is not None:
        await server.server.stop(None)


# ---- process A: the driver ---------------------------------------------------------------------


def row(
    spec: Spec, tokens: int, nbytes: int, transport: str, variant: str, secs: list[float], **extra: Any
) -> dict[str, Any]:
    ms = 1e3 * statistics.median(secs)
    return {
        "tokens": tokens,
        "pages": tokens // spec.page_size,
        "bytes": nbytes,
        "transport": transport,
        "variant": variant,
        "ms": ms,
        "gbps": nbytes / ms / 1e6,
        "reps_ms": [1e3 * s for s in secs],
        **extra,
    }


def measure_nixl(
    spec: Spec, variant: Variant, layout: PageLayout, agent: NixlAgent, peer: str, conn: Any, tokens: int
) -> list[dict[str, Any]]:
    src, dst = spec.plan(tokens)
    nbytes = layout.nbytes(len(src))
    conn.send(("clear", dst))
    conn.recv()
    posts, dones, notifs = [], [], []
    for rep in range(spec.warmup + spec.reps):
        tag = f"{tokens}-{rep}".encode()
        conn.send(("notif", tag))
        assert conn.recv() == "armed"
        start = time.perf_counter()
        handle = agent.write(peer, src, dst, tag)
        posted = time.perf_counter()
        while (state := agent.state(handle)) == "PROC":
            pass
        done = time.perf_counter()
        notified = conn.recv()
        agent.release(handle)
        if state != "DONE":
            raise RuntimeError(f"NIXL write ended in {state}")
        if rep >= spec.warmup:
            posts.append(posted - start)
            dones.append(done - start)
            notifs.append(notified - start)
    conn.send(("digest", dst))
    correct = conn.recv() == digest(layout, src)
    runs = len(page_runs(src, dst))
    descs = f"{runs * len(layout.buffers)} descriptors ({len(layout.buffers)} buffers x {runs} runs)"
    note = f"write() {1e3 * statistics.median(posts):.2f} ms, {descs}"
    done_row = row(spec, tokens, nbytes, "nixl-done", variant.name, dones, correct=correct, note=note)
    notif_row = row(
        spec, tokens, nbytes, "nixl-notif", variant.name, notifs, correct=correct, note="B took it"
    )
    return [done_row, notif_row]


async def measure_grpc(spec: Spec, layout: PageLayout, port: int, conn: Any, tokens: int) -> dict[str, Any]:
    src, dst = spec.plan(tokens)
    nbytes = layout.nbytes(len(src))
    conn.send(("clear", dst))
    conn.recv()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    totals, reads, streams, writes = [], [], [], []
    try:
        for rep in range(spec.warmup + spec.reps):
            rid = f"{tokens}-{rep}"
            conn.send(("expect", rid, dst))
            conn.recv()
            commit = KvCommit(rid, 1, 0).encode()
            start = time.perf_counter()
            payload = layout.read_pages(src)
            read = time.perf_counter()
            await send_kv(channel, rid, payload, commit, spec.chunk_bytes)
            end = time.perf_counter()
            del payload
            conn.send(("times", rid))
            received, written = conn.recv()
            if rep >= spec.warmup:
                totals.append(end - start)
                reads.append(read - start)
                streams.append(received - read)
                writes.append(written - received)
    finally:
        await channel.close()
    conn.send(("digest", dst))
    correct = conn.recv() == digest(layout, src)
    split = "read_pages {:.1f} ms, stream {:.1f} ms, write_pages {:.1f} ms".format(
        *(1e3 * statistics.median(x) for x in (reads, streams, writes))
    )
    note = f"{split}; {spec.chunk_bytes / (1 << 20):g} MiB messages"
    return row(spec, tokens, nbytes, "grpc", "", totals, correct=correct, note=note)


def measure_copies(
    spec: Spec, layout: PageLayout, remote: list[torch.Tensor] | None, conn: Any, tokens: int
) -> list[dict[str, Any]]:
    n = tokens // spec.page_size
    pages = list(range(1, n + 1))
    nbytes = layout.nbytes(n)
    # [n * page_bytes] flat bytes of pages 1..n of each buffer
    local = [
        buf.view(torch.uint8).view(-1)[pb : (n + 1) * pb]
        for buf, pb in zip(layout.buffers, layout.page_bytes)
    ]
    threads = f"torch {torch.get_num_threads()} threads" if spec.device == "cpu" else "device copies"
    rows = []
    if remote is not None:
        conn.send(("clear", pages))
        conn.recv()
        dst = [
            buf.view(torch.uint8).view(-1)[pb : (n + 1) * pb] for buf, pb in zip(remote, layout.page_bytes)
        ]
        secs = _time_copies(spec, local, dst)
        conn.send(("digest", pages))
        correct = conn.recv() == digest(layout, pages)
        note = f"A -> B's pool via {'/dev/shm' if spec.device == 'cpu' else 'CUDA IPC'}, {threads}"
        rows.append(row(spec, tokens, nbytes, "copy-ipc", "", secs, correct=correct, note=note))
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=spec.device)  # all the pages: no cache hits
    secs = _time_copies(spec, local, list(scratch.split([x.numel() for x in local])))
    del scratch
    rows.append(row(spec, tokens, nbytes, "copy-local", "", secs, correct=True, note=f"inside A, {threads}"))
    return rows


def _time_copies(spec: Spec, src: list[torch.Tensor], dst: list[torch.Tensor]) -> list[float]:
    secs = []
    for rep in range(spec.warmup + spec.reps):
        sync(spec.device)
        start = time.perf_counter()
        for s, d in zip(src, dst):
            d.copy_(s)
        sync(spec.device)
        if rep >= spec.warmup:
            secs.append(time.perf_counter() - start)
    return secs


def run_a(spec: Spec, variant: Variant, conn: Any, out: Any) -> None:
    try:
        out.send(("ok", _drive(spec, variant, conn)))
    except BaseException as e:
        out.send(("error", f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (did B die?)"))
        raise
    finally:
        with contextlib.suppress(OSError):
            conn.send(("stop",))


def _drive(spec: Spec, variant: Variant, conn: Any) -> list[dict[str, Any]]:
    layout = PageLayout(make_pool(spec, fill=True, shared=False), spec.page_size)
    agent = (
        NixlAgent(layout, "prefill", progress_thread=variant.progress_thread)
        if "nixl" in spec.transports
        else None
    )
    metadata, port, remote = conn.recv()
    peer = agent.add_peer(metadata) if agent is not None else ""
    rows: list[dict[str, Any]] = []
    for tokens in spec.tokens:
        if agent is not None:
            rows += measure_nixl(spec, variant, layout, agent, peer, conn, tokens)
        if "grpc" in spec.transports:
            rows.append(asyncio.run(measure_grpc(spec, layout, port, conn, tokens)))
        if "copy" in spec.transports:
            rows += measure_copies(spec, layout, remote, conn, tokens)
    return rows


def run_idle(spec: Spec, progress_thread: bool, seconds: float, out: Any) -> None:
    """An idle agent over a small pool: the CPU its process burns while nothing moves."""
    import resource

    layout = PageLayout([torch.zeros(16 * spec.page_size, spec.kv_heads, spec.head_dim)], spec.page_size)
    agent = NixlAgent(layout, "decode", progress_thread=progress_thread)
    time.sleep(0.5)  # let start-up settle
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    time.sleep(seconds)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    out.send(100 * cpu / wall)
    del agent


def measure_idle(spec: Spec, seconds: float) -> list[dict[str, Any]]:
    rows = []
    ctx = mp.get_context("spawn")
    for progress_thread in (False, True):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=run_idle, args=(spec, progress_thread, seconds, send))
        proc.start()
        percent = recv.recv()
        proc.join(30)
        name = "pt" if progress_thread else "default"
        rows.append(
            {"transport": "idle-cpu", "variant": name, "percent_of_core": percent, "seconds": seconds}
        )
    return rows


def run_pair(spec: Spec, variant: Variant) -> list[dict[str, Any]]:
    """A and B in fresh processes, with the variant's UCX settings in their environment."""
    ctx = mp.get_context("spawn")
    a_end, b_end = ctx.Pipe()
    out_recv, out_send = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in variant.env}
    os.environ.update(variant.env)
    try:
        b = ctx.Process(target=run_b, args=(spec, variant, b_end), name="kv-b")
        a = ctx.Process(target=run_a, args=(spec, variant, a_end, out_send), name="kv-a")
        b.start()
        a.start()
    finally:
        for end in (a_end, b_end, out_send):  # only the children hold them: a death reads as EOF
            end.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        status, result = out_recv.recv()
    except EOFError:
        status, result = "error", "process A died"
    a.join(60)
    b.join(60)
    for p in (a, b):
        if p.is_alive():
            p.kill()
    if status != "ok":
        raise RuntimeError(f"variant {variant.name!r}: {result}")
    return result


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", default="1024,4096,16384", help="request sizes, comma-separated")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--fragmented", action="store_true", help="shuffled page ids on both sides")
    parser.add_argument(
        "--pool-pages", type=int, default=0, help="pages per pool (default: the largest request + 1)"
    )
    parser.add_argument(
        "--chunk-mib", type=float, default=KV_CHUNK_BYTES / (1 << 20), help="gRPC message size"
    )
    parser.add_argument("--transports", default="nixl,grpc,copy", help="any of nixl, grpc, copy")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    parser.add_argument("--ucx-tls", help="sets UCX_TLS for every process pair (unless a variant sets it)")
    parser.add_argument(
        "--variants", default="default", help='";"-separated, e.g. "default; UCX_TLS=tcp; pt"'
    )
    parser.add_argument("--idle-seconds", type=float, default=3, help="idle agent CPU measurement (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.ucx_tls:
        os.environ["UCX_TLS"] = args.ucx_tls
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    skipped = []
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        skipped.append("cuda: CUDA is not available here; running on cpu")
        device = "cpu"
    if "nixl" in transports:
        try:
            import_nixl()
        except ImportError as e:
            skipped.append(f"nixl: {e}")
            transports.remove("nixl")
    tokens = [int(t) for t in args.tokens.split(",")]
    if any(t % args.page_size for t in tokens):
        raise SystemExit("--tokens must be multiples of --page-size")
    spec = Spec(
        layers=args.layers,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        page_size=args.page_size,
        dtype=args.dtype,
        device=device,
        tokens=tokens,
        reps=args.reps,
        warmup=args.warmup,
        fragmented=args.fragmented,
        chunk_bytes=int(args.chunk_mib * (1 << 20)),
        pool_pages=max(args.pool_pages, max(tokens) // args.page_size + 1),
        transports=transports,
        threads=args.threads,
    )
    variants = [Variant.parse(v) for v in args.variants.split(";") if v.strip()] or [Variant("default")]
    if "nixl" not in transports and len(variants) > 1:
        skipped.append("variants: they re-run NIXL, which is not measured")
        variants = variants[:1]
    for line in skipped:
        print(f"skipped: {line}", flush=True)
    page_mb = (
        spec.page_size * spec.kv_heads * spec.head_dim * DTYPES[spec.dtype].itemsize * 2 * spec.layers / 1e6
    )
    print(
        f"{spec.layers} layers x (K, V) [{spec.kv_heads}, {spec.head_dim}] {spec.dtype} on {device},"
        f" page {spec.page_size}"
        f" ({page_mb:.2f} MB/page over {2 * spec.layers} buffers), pools of {spec.pool_pages} pages,"
        f" {'fragmented' if spec.fragmented else 'contiguous'} page lists, median of {spec.reps}",
        flush=True,
    )
    ucx_env = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    rows: list[dict[str, Any]] = []
    rows += run_pair(spec, variants[0])
    for variant in variants[1:]:  # a variant UCX cannot run is reported, not fatal
        try:
            rows += run_pair(Spec(**{**asdict(spec), "transports": ["nixl"]}), variant)
        except RuntimeError as e:
            skipped.append(f"variant {variant.name}: {e}")
            print(f"skipped: {skipped[-1]}", flush=True)
    idle = measure_idle(spec, args.idle_seconds) if "nixl" in transports and args.idle_seconds > 0 else []
    add_fractions(rows)
    print_table(rows)
    for r in idle:
        thread = "on" if r["variant"] == "pt" else "off"
        percent, secs = r["percent_of_core"], r["seconds"]
        print(f"idle NIXL agent, progress thread {thread}: {percent:.1f}% of a core over {secs:g} s")
    if args.json:
        report = {
            "spec": asdict(spec),
            "variants": [asdict(v) for v in variants],
            "ucx_env": ucx_env,
            "skipped": skipped,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__,
            "rows": rows,
            "idle": idle,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


def add_fractions(rows: list[dict[str, Any]]) -> None:
    """Each row's GB/s over the limit of its size: copy-ipc, else copy-local (None: neither)."""
    limits = {r["tokens"]: r["gbps"] for r in rows if r["transport"] == "copy-ipc"}
    for r in rows:
        if r["transport"] == "copy-local":
            limits.setdefault(r["tokens"], r["gbps"])
    for r in rows:
        limit = limits.get(r["tokens"])
        r["fraction_of_limit"] = r["gbps"] / limit if limit else None


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = f"{'tokens':>7} {'MB':>8} {'transport':<12} {'variant':<22} {'ms':>9} {'GB/s':>7}"
    header = f"{cols} {'of limit':>8}  ok  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        frac = "-" if r["fraction_of_limit"] is None else f"{r['fraction_of_limit']:.2f}"
        print(
            f"{r['tokens']:>7} {r['bytes'] / 1e6:>8.1f} {r['transport']:<12} {r['variant'][:22]:<22}"
            f" {r['ms']:>9.2f} {r['gbps']:>7.2f} {frac:>8}  {'yes' if r['correct'] else 'NO':<3}"
            f" {r.get('note', '')}"
        )


if __name__ == "__main__":
    main()
