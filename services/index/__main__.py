"""Run one index shard: python -m services.index (settings: INDEX_* environment variables).

`python -m services.index verify DIR` checks a shard's data directory (exit 0: clean, 1: damaged) and
`python -m services.index salvage DIR` makes a damaged one loadable, keeping every intact record and
reporting what it could not keep (exit 0: nothing lost, 1: something was); run them on a stopped shard.
"""

import argparse
import asyncio
import socket
import sys
from pathlib import Path

import grpc
from embeddings.v1 import index_pb2, index_pb2_grpc
from pydantic import ValidationError

from services.common.server import serve
from services.index import salvage, verify
from services.index.memory import return_freed_arrays
from services.index.service import IndexService
from services.index.settings import ShardSettings
from services.index.store import IndexStore


def run_shard() -> None:
    return_freed_arrays()
    try:
        settings = ShardSettings()
    except ValidationError as error:  # a settings error is one message, not a traceback
        sys.exit(f"index cannot start: {error}")
    store = IndexStore(settings)
    shard = settings.shard_name or f"{socket.gethostname()}:{settings.port}"
    service = IndexService(store, settings, shard)

    def register(server: grpc.aio.Server) -> list[str]:
        index_pb2_grpc.add_IndexServicer_to_server(service, server)
        return [index_pb2.DESCRIPTOR.services_by_name["Index"].full_name]

    asyncio.run(serve("index", settings, register, store.open, store.close))


def repair(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.index", description=__doc__.split("\n\n")[1])
    parser.add_argument("command", choices=["verify", "salvage"])
    parser.add_argument("data_dir", type=Path, help="the shard's INDEX_DATA_DIR (the shard stopped)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        verdict = verify.verify(args.data_dir)
        print("\n".join(verify.report(args.data_dir, verdict)))
        return 0 if verdict.clean else 1
    salvaged = salvage.salvage(args.data_dir)
    print("\n".join(salvage.report(args.data_dir, salvaged)))
    return 1 if salvaged.lost else 0


def main() -> None:
    if len(sys.argv) > 1:
        raise SystemExit(repair(sys.argv[1:]))
    run_shard()


if __name__ == "__main__":
    main()
