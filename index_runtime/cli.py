"""The ``driftless`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from index_runtime.contract import TOKENS_DIR, TOKENS_FILE, Env, ExitCode, JobKind
from index_runtime.errors import DriftlessError, InvalidInputError

if TYPE_CHECKING:
    from index_runtime.index.vectors import VectorStorage
    from index_runtime.service.auth import TokenSet
    from index_runtime.service.engine import Encoder, ServeConfig
    from index_runtime.service.limits import ApiLimits
    from index_runtime.service.runtime import Roles

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def set_omp_threads(n: int) -> None:
    """OpenMP threads for FAISS. Must happen before FAISS is loaded: libgomp copies the
    environment into every new thread, while omp_set_num_threads() only affects the thread
    that calls it (uvicorn's workers and our training thread would not see it). On 2 cores,
    2 threads made queries and training contend for 10x longer (measured in the demo)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "faiss" in sys.modules:  # too late for other threads; at least this one
        sys.modules["faiss"].omp_set_num_threads(n)


def omp_threads(flag: int | None, env: Mapping[str, str]) -> int:
    """Threads per query worker: ``--omp-threads``, else ``OMP_NUM_THREADS`` (in a cluster the
    operator sets it from the container's CPU limit), else 1; at least 1."""
    if flag is not None:
        return max(1, flag)
    try:
        return max(1, int(env.get(Env.OMP_THREADS, "") or 1))
    except ValueError:
        return 1


def _default_cache() -> Path:
    """The demo's embedding cache: $XDG_CACHE_HOME, else ~/.cache, else the temp dir (a uid
    with no passwd entry and no HOME has no home). Resolved only when the demo runs: every
    other command (serve, job, operator) must start under such a uid, as pods run."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "driftless"
    try:
        return Path.home() / ".cache" / "driftless"
    except RuntimeError:
        return Path(tempfile.gettempdir()) / "driftless-cache"


def cmd_demo(args: argparse.Namespace) -> int:
    set_omp_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from index_runtime.demo import format_table, run_demo

    start = time.perf_counter()
    stages = run_demo(
        Path(args.data),
        Path(args.cache) if args.cache else _default_cache(),
        args.embed_seconds,
        args.max_passages,
        args.delete_share,
        upgrade_seconds=args.upgrade_seconds,
        target_seconds=args.seconds,
    )
    print()
    print(format_table(stages))
    print(f"\ntotal {time.perf_counter() - start:.1f} s; data in {args.data}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from index_runtime.store.log import ManifestLog
    from index_runtime.store.objects import LocalDirStore

    log = ManifestLog(LocalDirStore(args.data))
    m = log.load(args.version) if args.version else log.latest()
    if m is None:
        print(f"no index in {args.data}", file=sys.stderr)
        return 2
    summary = {
        "version": m.version,
        "epoch": m.writer_epoch,
        "flushed_seq": m.flushed_seq,
        "live_rows": m.live_rows,
        "segments": len(m.segments),
        "bytes": m.total_bytes,
        "retired": len(m.retired),
        "index": {
            "name": m.index.name,
            "key_type": m.index.key_type,
            "models": {k: asdict(v) for k, v in m.index.models.items()},
        },
    }
    print(json.dumps(summary, indent=2))
    return 0


def lazy_encoders() -> dict[str, Encoder]:
    """Encoders this install can run, each loaded on first use (a model takes seconds to load)."""
    import numpy as np

    from index_runtime.encoders import LOCAL_MODELS, Kind, open_encoder
    from index_runtime.errors import EncoderRejectedError

    state: dict[str, Any] = {}

    # DRIFTLESS_ENCODERS maps model names (an EmbeddingModel's name) to encoder specs
    names: dict[str, str] = {m: m for m in LOCAL_MODELS}
    raw = os.environ.get(Env.ENCODERS)
    if raw:
        extra = json.loads(raw)
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise InvalidInputError(f"{Env.ENCODERS} must be a JSON object of model -> spec")
        names.update(extra)

    def loader(model: str) -> Encoder:
        def encode(texts: list[str], kind: Kind) -> np.ndarray:
            if model not in state:
                try:
                    state[model] = open_encoder(names[model])
                except ValueError as exc:  # an unknown spec: permanent (errors.py)
                    raise EncoderRejectedError(str(exc)) from exc
            return np.asarray(state[model].encode(texts, kind))

        return encode

    return {m: loader(m) for m in names}


def load_tokens(
    path: str | None, from_env: bool, env: dict[str, str]
) -> tuple[TokenSet, Path | None, TokenSet]:
    """(the ``Env.*_TOKEN`` values, the tokens file, everything accepted now). The file is
    ``--tokens-file``, else ``Env.TOKENS_FILE``, else (with --from-env) the mounted Secret at
    TOKENS_DIR/TOKENS_FILE when present; the server re-reads it when it changes."""
    from index_runtime.service.auth import parse_tokens_file, tokens_from_env

    path = path or env.get(Env.TOKENS_FILE) or None
    mounted = Path(TOKENS_DIR) / TOKENS_FILE
    if path is None and from_env and mounted.is_file():
        path = str(mounted)
    plain = tokens_from_env(env)
    if path is None:
        return plain, None, plain
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the tokens file {path}: {exc}") from None
    return plain, Path(path), parse_tokens_file(text, path) + plain


def api_limits(args: argparse.Namespace, env: Mapping[str, str]) -> ApiLimits:
    """The API's limits from the flags `serve` and `route` share, or their variables."""
    from index_runtime.service.limits import ApiLimits

    return ApiLimits.from_env(
        env,
        max_body_bytes=args.max_body_bytes,
        max_batch_rows=args.max_batch_rows,
        max_batch_queries=args.max_batch_queries,
        max_response_bytes=args.max_response_bytes,
    )


def serve_config(
    args: argparse.Namespace,
    env: Mapping[str, str],
    roles: Roles,
    tokens: TokenSet,
    tokens_file: Path | None,
    limits: ApiLimits,
) -> ServeConfig:
    """The engine's configuration from ``serve``'s arguments; with ``--from-env`` (in a
    cluster) storage, URLs and the one index to serve (``Env.INDEX``) come from ``env`` where
    no flag gave them (filled into ``args``)."""
    from index_runtime.querylog import QueryLogSettings
    from index_runtime.service.engine import ServeConfig
    from index_runtime.service.runtime import RuntimeOptions
    from index_runtime.store.objects import S3Config

    if args.from_env:  # in a cluster: storage and URLs from the contract's environment
        args.s3_bucket = args.s3_bucket or env.get(Env.S3_BUCKET)
        args.s3_prefix = args.s3_prefix or env.get(Env.S3_PREFIX, "")
        args.s3_endpoint = args.s3_endpoint or env.get(Env.S3_ENDPOINT) or None
        args.s3_region = args.s3_region or env.get(Env.S3_REGION) or None
        args.shadow_url = args.shadow_url or env.get(Env.SHADOW_URL) or None
        args.writer_url = env.get(Env.WRITER_URL) or None  # readers forward sampled queries
        args.index = args.index or env.get(Env.INDEX) or None
        args.vectors = args.vectors or env.get(Env.VECTORS) or None
        args.vector_cache_dir = args.vector_cache_dir or env.get(Env.VECTOR_CACHE_DIR) or None
        if args.vector_cache_bytes is None and env.get(Env.VECTOR_CACHE_BYTES):
            args.vector_cache_bytes = parse_int(Env.VECTOR_CACHE_BYTES, env[Env.VECTOR_CACHE_BYTES])
    if not (args.data or args.s3_bucket):
        raise InvalidInputError(f"give --data or --s3-bucket (or {Env.S3_BUCKET} with --from-env)")
    s3 = None
    if args.s3_bucket:
        s3 = S3Config(args.s3_bucket, args.s3_prefix, args.s3_endpoint, args.s3_region)
    return ServeConfig(
        data=Path(args.data) if args.data else None,
        s3=s3,
        wal_dir=Path(args.wal_dir) if args.wal_dir else None,
        roles=roles,
        options=RuntimeOptions(
            maintenance=args.maintenance == "on",
            tick_s=args.tick,
            shadow_url=args.shadow_url,
            query_log=QueryLogSettings.from_env(env),  # off unless Env.QUERY_LOG is "1"
            writer_url=getattr(args, "writer_url", None),
            vectors=vector_storage(args),
        ),
        tokens=tokens,
        tokens_file=tokens_file,
        limits=limits,
        only=args.index,
    )


def parse_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, not {raw!r}") from None


def vector_storage(args: argparse.Namespace) -> VectorStorage:
    """``--vectors`` and its cache flags as a :class:`VectorStorage` (memory by default; mmap
    caches under ``--vector-cache-dir``, else ``<data>/.vector-cache``)."""
    from index_runtime.index.vectors import DEFAULT_CACHE_BYTES, VectorStorage

    mode = args.vectors or "memory"
    cache_dir = args.vector_cache_dir
    if mode == "mmap" and cache_dir is None and args.data:
        cache_dir = str(Path(args.data) / ".vector-cache")
    try:
        return VectorStorage(
            mode,  # type: ignore[arg-type]  # checked by VectorStorage (env values too)
            Path(cache_dir) if cache_dir else None,
            DEFAULT_CACHE_BYTES if args.vector_cache_bytes is None else args.vector_cache_bytes,
        )
    except ValueError as exc:
        raise InvalidInputError(f"{exc} (--vectors, --vector-cache-dir, {Env.VECTORS})") from None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.shards != 1:
        return serve_sharded(args)
    set_omp_threads(omp_threads(args.omp_threads, os.environ))
    import uvicorn

    from index_runtime.service.app import create_app
    from index_runtime.service.engine import Engine
    from index_runtime.service.metrics import Metrics
    from index_runtime.service.runtime import Roles

    roles = {
        "all": Roles(),
        "writer": Roles(True, False, False),
        "reader": Roles(False, True, False),
        "shadow": Roles(False, True, True),
    }[args.role]
    try:
        plain, tokens_file, tokens = load_tokens(args.tokens_file, args.from_env, dict(os.environ))
        limits = api_limits(args, os.environ)
    except DriftlessError as exc:
        print(f"error ({exc.reason}): {exc}", file=sys.stderr)
        return ExitCode.INVALID
    if not open_ok(tokens, args.host, args.insecure):
        return ExitCode.INVALID
    config = serve_config(args, os.environ, roles, plain, tokens_file, limits)
    metrics = Metrics()
    engine = Engine(config, metrics, lazy_encoders())
    engine.open_existing()
    engine.resume_migrations()
    app = create_app(engine, metrics)
    print(
        f"driftless serving {len(engine.runtimes)} index(es) from "
        f"{args.data or 's3://' + args.s3_bucket} on http://{args.host}:{args.port} "
        f"(maintenance {args.maintenance}, role {args.role}, "
        f"{'OPEN: no tokens' if tokens.open else f'{len(tokens.entries)} token(s)'})",
        flush=True,
    )
    server_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(args.grace),
    )
    # SIGTERM: uvicorn stops accepting, drains requests for up to --grace seconds, then the
    # app's lifespan stops every runtime (loops and operations joined, writers flushed and
    # committed); the process then exits 0
    graceful_server(server_config).run()
    return 0


def shard_children(args: argparse.Namespace, actions: list[argparse.Action]) -> list[Any]:
    """The children of ``serve --shards N``: shard i serves ``shard_prefix(location, i, N)``
    (its data directory or S3 prefix; its WAL and vector cache too when given) on a free
    loopback port, with every other flag as given."""
    from index_runtime.service.supervisor import Child, argv_of, free_port
    from index_runtime.shards import shard_prefix

    n = args.shards
    children = []
    for i in range(n):
        port = free_port()
        over: dict[str, Any] = {"host": "127.0.0.1", "port": port}
        if args.data:
            over["data"] = shard_prefix(args.data, i, n)
        else:
            over["s3_prefix"] = shard_prefix(args.s3_prefix or "", i, n)
        for dest in ("wal_dir", "vector_cache_dir"):
            if getattr(args, dest):
                over[dest] = shard_prefix(getattr(args, dest), i, n)
        children.append(Child(i, port, argv_of(actions, args, over, frozenset({"shards"}))))
    return children


def serve_sharded(args: argparse.Namespace) -> int:
    """``serve --shards N``: N child ``serve`` processes and the router on --host/--port."""
    import uvicorn

    from index_runtime.routing import ShardUrls
    from index_runtime.service.router import Router, RouterConfig, RouterMetrics, create_router_app
    from index_runtime.service.supervisor import Supervisor
    from index_runtime.service.tokens import TokenSource
    from index_runtime.shards import check_shards

    try:
        check_shards(args.shards)
    except ValueError as exc:
        print(f"error: --shards: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    if args.from_env or not (args.data or args.s3_bucket):
        print(
            "error: --shards needs --data or --s3-bucket (in a cluster the operator runs "
            "each shard's pods and `driftless route`)",
            file=sys.stderr,
        )
        return ExitCode.INVALID
    try:
        plain, tokens_file, tokens = load_tokens(args.tokens_file, False, dict(os.environ))
        limits = api_limits(args, os.environ)
        source = TokenSource(plain, tokens_file)
        passes = router_pass(os.environ)
    except DriftlessError as exc:
        print(f"error ({exc.reason}): {exc}", file=sys.stderr)
        return ExitCode.INVALID
    if not open_ok(tokens, args.host, args.insecure):
        return ExitCode.INVALID
    children = shard_children(args, _subparser(build_parser(), "serve")._actions)
    sup = Supervisor(children, os.environ)
    urls = ShardUrls.of([c.url for c in children])
    config = RouterConfig(urls, source, limits, index=args.index, **passes)
    router = Router(config, RouterMetrics())
    sup.start()
    print(
        f"driftless serving {args.shards} shards of {args.data or 's3://' + args.s3_bucket} "
        f"(children on {', '.join(urls.writers)}) through the router on "
        f"http://{args.host}:{args.port} "
        f"({'OPEN: no tokens' if tokens.open else f'{len(tokens.entries)} token(s)'})",
        flush=True,
    )
    server = uvicorn.Config(
        create_router_app(router),
        host=args.host,
        port=args.port,
        log_level="warning",
        **ROUTER_SERVER,
        timeout_graceful_shutdown=int(args.grace),
    )
    try:
        graceful_server(server).run()
    finally:
        sup.stop(args.grace + 5)
    return 0


def router_pass(env: Mapping[str, str]) -> dict[str, Any]:
    """The router's own pass over coordinated migrations: its admin token and its interval
    (``Env.ROUTER_PASS_S``, seconds; 0 turns it off)."""
    admin = env.get(Env.ADMIN_TOKEN)
    raw = env.get(Env.ROUTER_PASS_S, "2")
    try:
        every = float(raw)
    except ValueError:
        raise InvalidInputError(f"{Env.ROUTER_PASS_S}={raw!r}: seconds, a number") from None
    if not every >= 0 or every == float("inf"):
        raise InvalidInputError(f"{Env.ROUTER_PASS_S}={raw!r}: seconds, 0 or more")
    return {"admin_token": f"Bearer {admin}" if admin else None, "coordinate_s": every}


def open_ok(tokens: TokenSet, host: str, insecure: bool) -> bool:
    """False (and why, on stderr) for a server without tokens on a non-loopback address."""
    if tokens.open and host not in LOOPBACK and not insecure:
        print(
            f"error: refusing to serve on {host} without tokens: anyone who can reach it "
            f"could write and delete. Give --tokens-file (or {Env.TOKENS_FILE}, "
            f"{Env.ADMIN_TOKEN}, ...), bind 127.0.0.1, or pass --insecure.",
            file=sys.stderr,
        )
        return False
    return True


# the router's uvicorn: uvloop and httptools are dependencies (named, not "auto", so a missing
# one fails at start instead of falling back to the slower asyncio/h11); no access log
ROUTER_SERVER: dict[str, Any] = {"loop": "uvloop", "http": "httptools", "access_log": False}


def route_urls(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The shards' writer and reader URLs: the flags, else (--from-env) the contract's
    ``Env.SHARD_WRITERS`` / ``Env.SHARD_READERS``."""
    from index_runtime.routing import parse_url_list

    writers, readers = list(args.shard_writer or []), list(args.shard_reader or [])
    if args.from_env:
        writers = writers or parse_url_list(env.get(Env.SHARD_WRITERS))
        readers = readers or parse_url_list(env.get(Env.SHARD_READERS))
    return writers, readers


def cmd_route(args: argparse.Namespace) -> int:
    """``driftless route``: the shards' router (the same public API as ``serve``)."""
    import uvicorn

    from index_runtime.routing import ShardUrls
    from index_runtime.service.engine import check_name
    from index_runtime.service.router import Router, RouterConfig, RouterMetrics, create_router_app
    from index_runtime.service.tokens import TokenSource

    env = dict(os.environ)
    try:
        writers, readers = route_urls(args, env)
        urls = ShardUrls.of(writers, readers)
        index = args.index or (env.get(Env.INDEX) if args.from_env else None) or None
        if index is not None:
            check_name(index)
        plain, tokens_file, tokens = load_tokens(args.tokens_file, args.from_env, env)
        source = TokenSource(plain, tokens_file)
        limits = api_limits(args, env)
        passes = router_pass(env)
    except DriftlessError as exc:
        print(f"error ({exc.reason}): {exc}", file=sys.stderr)
        return ExitCode.INVALID
    if not open_ok(tokens, args.host, args.insecure):
        return ExitCode.INVALID
    config = RouterConfig(urls, source, limits, index=index, timeout_s=args.timeout, **passes)
    print(
        f"driftless routing {urls.n} shard(s) on http://{args.host}:{args.port} "
        f"({'OPEN: no tokens' if tokens.open else f'{len(tokens.entries)} token(s)'})",
        flush=True,
    )
    server = uvicorn.Config(
        create_router_app(Router(config, RouterMetrics())),
        host=args.host,
        port=args.port,
        log_level="warning",
        **ROUTER_SERVER,
        timeout_graceful_shutdown=int(args.grace),
    )
    graceful_server(server).run()
    return 0


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = sub.choices[name]
    return found


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    for flag, env_help in (
        ("--max-body-bytes", "request body (default 64 MiB)"),
        ("--max-batch-rows", "keys per upsert/delete/fetch (default 10000)"),
        ("--max-batch-queries", "queries per search/batch (default 256)"),
        ("--max-response-bytes", "answer size, estimated then measured (default 32 MiB)"),
    ):
        env = "DRIFTLESS_" + flag.removeprefix("--").replace("-", "_").upper()
        p.add_argument(flag, type=int, default=None, help=f"limit: {env_help}; or {env}")


def graceful_server(config: Any) -> Any:
    """A uvicorn server for which SIGTERM is an ordinary, graceful stop (Kubernetes stops
    pods with it): the same drain and shutdown, but the signal is not re-raised afterwards
    (uvicorn re-raises it, so the process died with -15 after a clean shutdown). SIGINT
    keeps uvicorn's behaviour (a second one forces the exit)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM:
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

    return GracefulServer(config)


def cmd_job(args: argparse.Namespace) -> int:
    from index_runtime.jobs import run_job

    return run_job(JobKind(args.kind), os.environ)


def cmd_plan(args: argparse.Namespace) -> int:
    from index_runtime.index.memory import plan_memory
    from index_runtime.index.training import auto_nlist

    nlist = args.nlist or auto_nlist(args.vectors, args.nbits)
    m = args.m or max(1, args.dim // 8)
    p = plan_memory(args.vectors, args.dim, nlist, m, args.nbits)
    mib = 1 << 20
    print(f"{p.vectors:,} vectors x {p.dim} dims, IVF{nlist} PQ{m}x{p.nbits}")
    print(f"  reader  {p.reader_bytes / mib:10,.1f} MiB  (vectors for re-rank + PQ codes + ids)")
    print(
        f"  reader  {p.reader_mapped_bytes / mib:10,.1f} MiB  with --vectors mmap (PQ codes, lists, "
        f"key columns); its {p.vector_bytes / mib:,.1f} MiB\n"
        f"          {'':10} of vectors are read from {p.disk_bytes / mib:,.1f} MiB of segment "
        "copies on local disk\n"
        f"          {'':10} (--vector-cache-bytes; the pages searches touch are page cache)"
    )
    print(f"  shadow  {p.shadow_bytes / mib:10,.1f} MiB  (same view + oracle windows)")
    print(f"  writer  {p.writer_bytes / mib:10,.1f} MiB  (+ key index and memtable bound)")
    print(
        "The figures count the data structures. A reader process measured 1.26x (1M vectors)\n"
        "to 1.48x (100k) of its figure in RSS (allocator slack; bench/results/search.md), plus\n"
        "about 100 MiB for the interpreter and libraries (measured after imports): size limits\n"
        "with that headroom. Mapped readers: bench/results/vectors_mmap.md."
    )
    return 0


def format_versions(versions: list[dict[str, Any]]) -> str:
    """The ``driftless restore --list`` table (newest first)."""
    lines = [
        f"{'version':>8}  {'committed (UTC)':19}  {'live':>10}  {'rows':>10}  {'segs':>5}  "
        "restorable  reason"
    ]
    for v in versions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["committed_at"]))
        mark = "current" if v["current"] else ("yes" if v["restorable"] else "no")
        lines.append(
            f"{v['version']:>8}  {when:19}  {v['live']:>10,}  {v['rows']:>10,}  "
            f"{v['segments']:>5}  {mark:10}  {v['reason']}"
            + (f"  ({v['problem']})" if not v["restorable"] else "")
        )
    return "\n".join(lines)


def cmd_restore(args: argparse.Namespace) -> int:
    """List the index's retained versions or restore one, through the server's admin API.

    There is deliberately no mode that opens the store directly: restoring needs the writer
    (its epoch, key index and commit lock), and opening a second writer would fence the
    serving one. With the server stopped, start ``driftless serve`` and restore through it."""
    from index_runtime.contract import ExitCode
    from index_runtime.jobs import Admin, JobError

    token = os.environ.get(Env.ADMIN_TOKEN, "")
    if not token:
        print(f"error: set {Env.ADMIN_TOKEN} to the server's admin token", file=sys.stderr)
        return int(ExitCode.INVALID)
    api = Admin(args.url, args.index, token, timeout_s=args.timeout)
    try:
        if args.list:
            versions = api.call("GET", "/admin/versions")["versions"]
            print(json.dumps(versions, indent=2) if args.json else format_versions(versions))
        else:
            out = api.call("POST", "/admin/restore", {"version": args.version})
            print(
                json.dumps(out)
                if args.json
                else (
                    f"restored version {out['restored']} of {args.index} as version "
                    f"{out['manifest_version']} ({out['live']:,} live rows)"
                )
            )
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.code)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="driftless", description="Vector search that keeps serving through change."
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the lifecycle demo on a local directory")
    d.add_argument(
        "--data", default=".driftless/demo", help="directory for the demo index (recreated)"
    )
    d.add_argument(
        "--cache", default=None, help="embedding cache directory (default: ~/.cache/driftless)"
    )
    d.add_argument(
        "--seconds",
        type=float,
        default=180.0,
        help="target for the whole demo (s): the corpus is sized from both models' speeds",
    )
    d.add_argument(
        "--embed-seconds",
        type=float,
        default=None,
        help="cap on the encoding time of both models (s; default: what --seconds leaves)",
    )
    d.add_argument("--max-passages", type=int, default=None, help="cap the corpus size")
    d.add_argument("--delete-share", type=float, default=0.3, help="share of rows to delete")
    d.add_argument(
        "--upgrade-seconds",
        type=float,
        default=60.0,
        help="E5 encoding budget of the model-upgrade stage (sizes its pairs; 0 skips it)",
    )
    d.set_defaults(func=cmd_demo)
    s = sub.add_parser("serve", help="run the vector service (all roles in one process)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--data", help="local directory holding the indexes")
    where.add_argument("--s3-bucket", help="S3 bucket holding the indexes")
    s.add_argument(
        "--from-env", action="store_true", help="read storage and URLs from DRIFTLESS_* variables"
    )
    s.add_argument(
        "--index",
        default=None,
        help=f"serve only this index; others at the location are never opened ({Env.INDEX})",
    )
    s.add_argument("--s3-prefix", default="", help="prefix inside the bucket")
    s.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (non-AWS stores)")
    s.add_argument("--s3-region", default=None)
    s.add_argument("--wal-dir", default=None, help="WAL directory (default <data>/.wal)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--role", choices=["all", "writer", "reader", "shadow"], default="all")
    s.add_argument(
        "--maintenance",
        choices=["on", "off"],
        default="on",
        help="off: only apply decisions made elsewhere (the operator), through the admin API",
    )
    s.add_argument(
        "--shadow-url",
        default=None,
        help="readers: the shadow service to mirror sampled queries to",
    )
    s.add_argument("--tick", type=float, default=0.5, help="maintenance loop period (s)")
    s.add_argument(
        "--vectors",
        choices=["memory", "mmap"],
        default=None,
        help=f"where readers keep raw vectors (default memory; or {Env.VECTORS}): mmap reads "
        "them from memory-mapped local copies of the segments",
    )
    s.add_argument(
        "--vector-cache-dir",
        default=None,
        help=f"mmap: local segment copies (default <data>/.vector-cache; {Env.VECTOR_CACHE_DIR})",
    )
    s.add_argument(
        "--vector-cache-bytes",
        type=int,
        default=None,
        help="mmap: the cache's budget; files a view uses are kept even past it "
        f"(default 8 GiB; {Env.VECTOR_CACHE_BYTES})",
    )
    s.add_argument(
        "--omp-threads",
        type=int,
        default=None,
        help="OpenMP threads per query worker (default: OMP_NUM_THREADS, else 1)",
    )
    s.add_argument("--grace", type=float, default=25.0, help="graceful shutdown budget (s)")
    s.add_argument(
        "--tokens-file",
        default=None,
        help="file of accepted tokens, lines '<scope> sha256:<hex>' or '<scope> <token>' "
        f"(or {Env.TOKENS_FILE}); {Env.ADMIN_TOKEN} etc. add plain tokens. Never on argv",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without any token (open to anyone who can connect)",
    )
    add_limit_flags(s)
    s.add_argument(
        "--shards",
        type=int,
        default=1,
        help="N > 1: run N child serve processes, shard i on <data>/_shards/N/i (or the S3 "
        "prefix's), on loopback ports, and the shards' router on --host/--port",
    )
    s.set_defaults(func=cmd_serve)
    ro = sub.add_parser(
        "route", help="route the API of one sharded index to its shards' serve processes"
    )
    ro.add_argument("--index", default=None, help=f"route only this index ({Env.INDEX})")
    ro.add_argument(
        "--shard-writer", action="append", help="shard i's writer URL (repeat, in shard order)"
    )
    ro.add_argument(
        "--shard-reader",
        action="append",
        help="shard i's reader URL (repeat, in shard order; default: the writers)",
    )
    ro.add_argument(
        "--from-env",
        action="store_true",
        help=f"URLs, index and tokens from {Env.SHARD_WRITERS}, {Env.SHARD_READERS}, "
        f"{Env.INDEX} and the token variables",
    )
    ro.add_argument("--host", default="127.0.0.1")
    ro.add_argument("--port", type=int, default=8080)
    ro.add_argument("--timeout", type=float, default=30.0, help="one call to a shard (s)")
    ro.add_argument("--grace", type=float, default=25.0, help="graceful shutdown budget (s)")
    ro.add_argument("--tokens-file", default=None, help="as serve's (or DRIFTLESS_TOKENS_FILE)")
    ro.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without tokens"
    )
    add_limit_flags(ro)
    ro.set_defaults(func=cmd_route)
    j = sub.add_parser("job", help="run one operator Job (options in DRIFTLESS_JOB_SPEC)")
    j.add_argument("kind", choices=[k.value for k in JobKind])
    j.set_defaults(func=cmd_job)
    # other packages add commands (the operator: `driftless operator`) without the runtime
    # importing them
    from importlib.metadata import entry_points

    for ep in entry_points(group="driftless.commands"):
        ep.load()(sub)
    pl = sub.add_parser("plan", help="print the memory each role needs")
    pl.add_argument("--vectors", type=int, required=True)
    pl.add_argument("--dim", type=int, required=True)
    pl.add_argument("--nlist", type=int, default=0, help="default: auto")
    pl.add_argument("--m", type=int, default=0, help="PQ sub-quantizers (default dim/8)")
    pl.add_argument("--nbits", type=int, default=8)
    pl.set_defaults(func=cmd_plan)
    r = sub.add_parser(
        "restore",
        help=f"list an index's versions or restore one (admin API; token from {Env.ADMIN_TOKEN})",
    )
    r.add_argument("--url", required=True, help="the writer's URL, e.g. http://127.0.0.1:8080")
    r.add_argument("--index", required=True)
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="list retained versions")
    what.add_argument("--version", type=int, help="commit this version's state as a new one")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout (s)")
    r.set_defaults(func=cmd_restore)
    i = sub.add_parser("info", help="print the manifest summary of a local index directory")
    i.add_argument("--data", required=True)
    i.add_argument("--version", type=int, default=None)
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DriftlessError as exc:
        print(f"error ({exc.reason}): {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
