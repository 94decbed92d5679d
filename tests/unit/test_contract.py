"""The router's command line (contract.route_command) against the runtime's own parser."""

from __future__ import annotations

from index_runtime import contract
from index_runtime.cli import build_parser, cmd_route, route_urls
from index_runtime.contract import Env


def test_route_command_parses_with_the_runtimes_parser_and_reads_the_contracts_env() -> None:
    argv = contract.route_command()
    assert argv[0] == contract.EXECUTABLE
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_route and args.from_env
    assert args.port == contract.HTTP_PORT and args.host == "0.0.0.0"
    env = {
        Env.SHARD_WRITERS: "http://w0:8080,http://w1:8080",
        Env.SHARD_READERS: "http://r0:8080, http://r1:8080",
    }
    assert route_urls(args, env) == (
        ["http://w0:8080", "http://w1:8080"],
        ["http://r0:8080", "http://r1:8080"],
    )
    # flags win over the environment; without --from-env the environment is not read
    flagged = build_parser().parse_args(["route", "--shard-writer", "http://x:1"])
    assert route_urls(flagged, env) == (["http://x:1"], [])
