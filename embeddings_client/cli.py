"""`embeddings`: the gateway from the shell.

Exit codes: 0 success; 1 the service answered with an error (its status code and message on stderr), or
`health` found it not serving; 2 a usage error (bad arguments, an unreadable local file); 130 interrupted
(Ctrl-C). `--json` prints one JSON document on stdout instead of tables, for scripts.
"""

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

try:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table
    from rich.text import Text
except ImportError as missing:  # the client was installed without its `cli` extra
    raise SystemExit(
        f"the embeddings command needs {missing.name}: pip install 'embeddings-client[cli]'"
    ) from missing

from embeddings_client import bulk
from embeddings_client.cli_content import content_file, content_map_text, content_pair
from embeddings_client.connection import DEFAULT_ADDRESS
from embeddings_client.errors import EmbeddingsError
from embeddings_client.messages import KINDS, MIXES, Interaction, Query
from embeddings_client.results import Embeddings, Hit, Model, SearchResult
from embeddings_client.sync_client import Client

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class Output:
    """Tables for people, JSON for scripts."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.console = Console(highlight=False, soft_wrap=False)

    @property
    def interactive(self) -> bool:
        return not self.json and sys.stdout.isatty()

    def emit(self, document: Any, render: Callable[[Console], None]) -> None:
        if self.json:
            print(json.dumps(document, default=_plain))
        else:
            render(self.console)

    def line(self, message: str) -> None:
        """A line of text for people (not in --json mode)."""
        if not self.json:
            self.console.print(Text(message))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def query(argument: str) -> Query:
    """`@path`: the image file at path; anything else: a text."""
    return Path(argument[1:]) if argument.startswith("@") else argument


def hits_table(hits: list[Hit], title: str) -> Table:
    result = Table("#", "id", "score", "kind", "payload", title=title, header_style="bold")
    for rank, hit in enumerate(hits, start=1):
        payload = json.dumps(hit.payload) if hit.payload else ""
        result.add_row(str(rank), Text(hit.id), f"{hit.score:.4f}", hit.kind, Text(payload))
    return result


def model_text(model: Model) -> str:
    return f"{model.id} (version {model.version}, space {model.space})"


# --- the commands ------------------------------------------------------------------------------------


def encode(client: Client, args: argparse.Namespace, out: Output) -> int:
    options = {"model": args.model, "dimensions": args.dimensions}
    result: Embeddings
    if args.users or args.items:
        ids = list(args.inputs)
        result = client.encode_users(ids, **options) if args.users else client.encode_items(ids, **options)
    else:
        inputs = [query(argument) for argument in args.inputs]
        images = [item for item in inputs if not isinstance(item, str)]
        if images and len(images) != len(inputs):
            raise UsageError("encode takes texts or @images, not both in one call")
        result = (
            client.encode_image(images, **options)
            if images
            else client.encode_text([str(item) for item in inputs], **options)
        )

    def render(console: Console) -> None:
        console.print(Text(f"{model_text(result.model)}: {len(result)} x {result.vectors.shape[1]}"))
        shown = Table("input", "cached", "truncated", "vector", header_style="bold")
        for argument, row, cached, truncated in zip(
            args.inputs, result.vectors, result.cached, result.truncated, strict=True
        ):
            head = ", ".join(f"{value:.4f}" for value in row[:4])
            shown.add_row(Text(argument), str(cached), str(truncated), f"[{head}, ...]")
        console.print(shown)

    document = {
        "model": asdict(result.model),
        "vectors": result.vectors,
        "cached": result.cached,
        "truncated": result.truncated,
    }
    out.emit(document, render)
    return EXIT_OK


def encode_bulk(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Every item of PATH through the streaming Encode, in order; the vectors to a .npy file or stdout."""
    items = bulk.read_items(args.path)
    if not items:
        raise UsageError(f"{args.path}: nothing to encode")
    if args.output is not None and args.output.suffix != ".npy":
        raise UsageError(f"--output {args.output}: give a .npy file")
    batches: list[list[Query]] = [
        [item.text if item.text is not None else Path(str(item.image)) for item in batch]
        for batch in bulk.batched(items, args.batch)
    ]
    rows: list[np.ndarray] = []
    versions: list[Model] = []
    with _progress(out, len(items), "encoding") as advance:
        for result in client.encode_stream(batches, model=args.model, dimensions=args.dimensions):
            rows.append(result.vectors)
            versions.append(result.model)
            advance(len(result))
    vectors, model, ids = np.concatenate(rows), versions[-1], [item.id for item in items]
    if args.output is not None:
        np.save(args.output, vectors)
    document: dict[str, Any] = {"model": asdict(model), "ids": ids, "shape": list(vectors.shape)}
    document |= {"output": str(args.output)} if args.output is not None else {"vectors": vectors}

    def render(console: Console) -> None:
        saved = f", saved to {args.output} (rows: the ids below, in order)" if args.output else ""
        console.print(Text(f"{model_text(model)}: {vectors.shape[0]} x {vectors.shape[1]}{saved}"))
        shown = Table("#", "id", "vector", header_style="bold")
        for number, (item_id, row) in enumerate(zip(ids, vectors, strict=True), start=1):
            shown.add_row(str(number), Text(item_id), f"[{', '.join(f'{v:.4f}' for v in row[:4])}, ...]")
        console.print(shown)

    out.emit(document, render)
    if len(set(versions)) > 1:  # a new version was deployed mid-run: its vectors do not compare with the old
        found = ", ".join(sorted({one.version for one in versions}))
        print(f"error: the model changed version during the run ({found}): encode again", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def similarity(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.similarity(
        [query(args.query)], [query(candidate) for candidate in args.candidates], space=args.space
    )
    scores = [float(score) for score in result.scores[0]]

    def render(console: Console) -> None:
        console.print(Text(f"space {result.space}: {args.query}"))
        shown = Table("candidate", "score", header_style="bold")
        for candidate, score in zip(args.candidates, scores, strict=True):
            shown.add_row(Text(candidate), f"{score:.4f}")
        console.print(shown)

    document = {
        "space": result.space,
        "query_model": asdict(result.query_model),
        "candidate_model": asdict(result.candidate_model),
        "scores": dict(zip(args.candidates, scores, strict=True)),
    }
    out.emit(document, render)
    return EXIT_OK


def search(client: Client, args: argparse.Namespace, out: Output) -> int:
    where = dict(_key_value(pair) for pair in args.where)
    result = client.search(
        query(args.query),
        k=args.k,
        space=args.space,
        model=args.model,
        kinds=args.kind,
        where=where,
        all_spaces=args.all_spaces,
    )
    out.emit(search_document(result), lambda console: console.print(search_table(result)))
    return EXIT_OK


def hybrid(client: Client, args: argparse.Namespace, out: Output) -> int:
    where = dict(_key_value(pair) for pair in args.where)
    result = client.hybrid_search(
        query(args.query),
        args.user,
        k=args.k,
        weight=args.weight,
        mix=args.mix,
        space=args.space,
        model=args.model,
        useritem_model=args.useritem_model,
        candidates=args.candidates,
        kinds=args.kind,
        where=where,
    )
    out.emit(search_document(result), lambda console: console.print(search_table(result)))
    return EXIT_OK


def search_document(result: SearchResult) -> dict[str, object]:
    return {
        "space": result.space,
        "partial": result.partial,
        "missing_shards": result.missing_shards,
        "missing_spaces": result.missing_spaces,
        "spaces": [asdict(searched) for searched in result.spaces],
        "hits": [asdict(hit) for hit in result.hits],
    }


def search_table(result: SearchResult) -> Table:
    """The hits; for fused and hybrid searches, each hit's sources (space: rank) too."""
    lists = ", ".join(searched.model.space for searched in result.spaces)
    title = f"space {result.space}" if result.space else f"fused: {lists}"
    missing = [*result.missing_shards, *(f"space {space}" for space in result.missing_spaces)]
    title += f", partial: missing {', '.join(missing)}" if result.partial else ""
    if not result.spaces:
        return hits_table(result.hits, title)
    table = Table(
        "#", "id", "score", "from (space: rank)", "kind", "payload", title=title, header_style="bold"
    )
    for rank, hit in enumerate(result.hits, start=1):
        sources = ", ".join(f"{source.model.space}: {source.rank}" for source in hit.sources)
        payload = json.dumps(hit.payload) if hit.payload else ""
        table.add_row(str(rank), Text(hit.id), f"{hit.score:.4f}", Text(sources), hit.kind, Text(payload))
    return table


def delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.delete(args.ids, space=args.space)
    document = {"deleted": result.deleted, "not_found": result.not_found}
    out.emit(
        document,
        lambda console: console.print(
            Text(f"deleted {result.deleted} from {args.space}; {result.not_found} not found")
        ),
    )
    return EXIT_OK


def drop_space(client: Client, args: argparse.Namespace, out: Output) -> int:
    if not args.yes:
        raise ValueError(f"drop-space removes space {args.space!r} and every item in it: add --yes to do it")
    result = client.drop_space(args.space)
    document = {"dropped": result.dropped, "missing_shards": result.missing_shards}
    missing = (
        f"; shards that did not answer: {', '.join(result.missing_shards)}" if result.missing_shards else ""
    )
    out.emit(
        document,
        lambda console: console.print(Text(f"dropped {args.space}: {result.dropped} items{missing}")),
    )
    return EXIT_OK


def _key_value(pair: str) -> tuple[str, str]:
    key, separator, value = pair.partition("=")
    if not separator or not key:
        raise UsageError(f"--where takes key=value, not {pair!r}")
    return key, value


def index(client: Client, args: argparse.Namespace, out: Output) -> int:
    items = bulk.read_items(args.path)
    journal = bulk.Journal(args.journal or bulk.default_journal(args.path), args.space, args.model)
    if args.restart:
        journal.clear()
    done = journal.acknowledged()
    todo = [item for item in items if item.id not in done]
    skipped = len(items) - len(todo)
    if skipped:
        out.line(f"skipping {skipped} of {len(items)} items already indexed (journal {journal.path})")
    indexed = 0
    try:
        with _progress(out, len(todo)) as advance:
            for ack in client.upsert_stream(
                bulk.batched(todo, args.batch), space=args.space, model=args.model
            ):
                journal.record(ack.ids)
                indexed += len(ack.ids)
                advance(len(ack.ids))
    except EmbeddingsError:
        print(
            f"indexed {indexed} items before the error; they are in {journal.path}: run again to resume",
            file=sys.stderr,
        )
        raise
    document = {"indexed": indexed, "skipped": skipped, "total": len(items), "journal": str(journal.path)}
    out.emit(
        document,
        lambda console: console.print(
            Text(f"indexed {indexed}, skipped {skipped} already indexed, {len(items)} in all")
        ),
    )
    return EXIT_OK


def _progress(
    out: Output, total: int, label: str = "indexing"
) -> AbstractContextManager[Callable[[int], None]]:
    """A progress bar's `advance` on a terminal; elsewhere (--json, pipes, tests) a no-op."""
    if not out.interactive:
        return nullcontext(lambda count: None)
    return _Bar(out.console, total, label)


class _Bar(AbstractContextManager[Callable[[int], None]]):
    def __init__(self, console: Console, total: int, label: str) -> None:
        self._progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        )
        self._task = self._progress.add_task("index", total=total)

    def __enter__(self) -> Callable[[int], None]:
        self._progress.start()
        return lambda count: self._progress.advance(self._task, count)

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()


def fit(client: Client, args: argparse.Namespace, out: Output) -> int:
    interactions = list(_interactions(args.file, args.implicit))
    epochs = []
    parameters = dict(_parameter(pair) for pair in args.param)
    fitting = client.fit(
        interactions,
        model=args.model,
        implicit=args.implicit,
        kind=args.kind,
        parameters=parameters,
        item_content=content_file(args.content) if args.content else None,
        content_space=args.content_space,
    )
    for progress in fitting:
        epochs.append(asdict(progress))
        if progress.done and progress.model is not None:
            out.line(
                f"{model_text(progress.model)} ({progress.kind}): {progress.interactions} interactions, "
                f"{progress.users} users, {progress.items} items, validation RMSE "
                f"{progress.validation_rmse:.4f}, recall@10 {progress.validation_recall_at_10:.3f}, "
                f"NDCG@10 {progress.validation_ndcg_at_10:.3f} (epoch {progress.epoch})"
            )
            if progress.content_map is not None:
                out.line(content_map_text(progress.content_map))
        else:
            out.line(
                f"epoch {progress.epoch}/{progress.epochs}: loss {progress.train_loss:.4f}, "
                f"validation RMSE {progress.validation_rmse:.4f}, recall@10 "
                f"{progress.validation_recall_at_10:.3f}, NDCG@10 {progress.validation_ndcg_at_10:.3f}"
            )
    if out.json:
        print(json.dumps({**(epochs[-1] if epochs else {}), "progress": epochs}))
    return EXIT_OK


def _interactions(file: Path, implicit: bool) -> Iterator[Interaction]:
    """Rows of a CSV with columns user_id, item_id, rating (optional when implicit), timestamp (optional)."""
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        needed = {"user_id", "item_id"} | (set() if implicit else {"rating"})
        if not needed <= columns:
            raise UsageError(
                f"{file}: needs the columns {', '.join(sorted(needed))} (found: {', '.join(sorted(columns)) or 'none'})"
            )
        for row in reader:
            try:
                rating = float(row.get("rating") or 0)
                stamp = int(row.get("timestamp") or 0)
            except ValueError as error:
                raise UsageError(f"{file}, line {reader.line_num}: {error}") from None
            yield (row["user_id"], row["item_id"], rating, stamp)


def _parameter(pair: str) -> tuple[str, float]:
    name, separator, value = pair.partition("=")
    if separator:
        with contextlib.suppress(ValueError):
            return name, float(value)
    raise UsageError(f"--param {pair!r}: expected NAME=NUMBER, e.g. l2=250")


def recommend(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.recommend(
        args.user,
        k=args.k,
        model=args.model,
        include_seen=args.include_seen,
        exclude_items=args.exclude,
        candidate_items=args.candidates,
        fallback_below=args.fallback_below,
    )
    document = {
        "model": asdict(result.model),
        "items": [asdict(hit) for hit in result.items],
        "fallback": result.fallback,
    }
    title = model_text(result.model) + (" (popularity fallback)" if result.fallback else "")
    out.emit(document, lambda console: console.print(hits_table(result.items, title)))
    return EXIT_OK


def score(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.score(args.user, args.items, model=args.model)
    document = {"model": asdict(result.model), "items": [asdict(hit) for hit in result.items]}
    out.emit(document, lambda console: console.print(hits_table(result.items, model_text(result.model))))
    return EXIT_OK


def similar_items(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.similar_items(args.item, k=args.k, model=args.model)
    document = {"model": asdict(result.model), "items": [asdict(hit) for hit in result.items]}
    out.emit(document, lambda console: console.print(hits_table(result.items, model_text(result.model))))
    return EXIT_OK


def fold_in(client: Client, args: argparse.Namespace, out: Output) -> int:
    ratings = [_rating(pair) for pair in args.ratings]
    result = client.fold_in(ratings, k=args.k, model=args.model, include_seen=args.include_seen)
    document = {
        "model": asdict(result.model),
        "vector": result.vector,
        "items": [asdict(hit) for hit in result.items],
    }
    out.emit(document, lambda console: console.print(hits_table(result.items, model_text(result.model))))
    return EXIT_OK


def fold_in_items(client: Client, args: argparse.Namespace, out: Output) -> int:
    items = dict(content_pair(pair) for pair in args.items)
    result = client.fold_in_items(items, model=args.model, content_space=args.content_space)
    document = {"model": asdict(result.model), "added": result.added, "vectors": result.vectors}
    out.emit(
        document,
        lambda console: console.print(
            f"{model_text(result.model)}: {len(items)} items folded in ({result.added} new), "
            f"{result.vectors.shape[1] if result.vectors.size else 0}-d vectors"
        ),
    )
    return EXIT_OK


def _rating(pair: str) -> tuple[str, float]:
    item, separator, value = pair.rpartition("=")
    try:
        rating = float(value)
    except ValueError:
        rating = float("nan")
    if not separator or not item or rating != rating:
        raise UsageError(f"fold-in takes ITEM=RATING pairs (e.g. 260=5), not {pair!r}")
    return item, rating


def models(client: Client, args: argparse.Namespace, out: Output) -> int:
    found = client.list_models()

    def render(console: Console) -> None:
        shown = Table("id", "version", "dimension", "space", "kinds", "max tokens", header_style="bold")
        for model in found:
            shown.add_row(
                Text(model.id),
                model.version,
                str(model.dimension),
                Text(model.space),
                ", ".join(model.input_kinds),
                str(model.max_input_tokens or ""),
            )
        console.print(shown)

    out.emit([asdict(model) for model in found], render)
    return EXIT_OK


def health(client: Client, args: argparse.Namespace, out: Output) -> int:
    status = client.health(args.service)
    out.emit({"status": status}, lambda console: console.print(Text(status)))
    return EXIT_OK if status == "SERVING" else EXIT_ERROR


# --- arguments ---------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad arguments or local input found after parsing: exit code 2."""


def _global_options(parser: argparse.ArgumentParser, main: bool) -> None:
    """The connection and output options, accepted before and after the command. On the subcommands they
    default to SUPPRESS (and stay out of their help), so an option given before the command is not reset
    by the subcommand's default."""
    group = parser.add_argument_group("connection and output") if main else parser

    def add(*flags: str, default: Any, help: str, **options: Any) -> None:
        if main:
            group.add_argument(*flags, default=default, help=help, **options)
        else:
            group.add_argument(*flags, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **options)

    address = os.environ.get("EMBEDDINGS_ADDRESS", DEFAULT_ADDRESS)
    add("--address", default=address, help="gateway host:port (env EMBEDDINGS_ADDRESS; default %(default)s)")
    add("--token", default=os.environ.get("EMBEDDINGS_TOKEN"), help="bearer token (env EMBEDDINGS_TOKEN)")
    add("--tls", action="store_true", default=False, help="TLS with the system's root CAs")
    add("--ca", type=Path, default=None, help="PEM file of the CA of the gateway's certificate (implies TLS)")
    add("--cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS")
    add("--key", type=Path, default=None, help="the client certificate's key (PEM)")
    add(
        "--timeout",
        type=float,
        default=None,
        help="deadline of each call in seconds (default 30; index, fit 3600)",
    )
    add("--json", action="store_true", default=False, help="print JSON, for scripts")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="embeddings",
        description="Encode, compare, index, search and recommend through the embeddings gateway.",
        epilog="Exit codes: 0 OK, 1 error from the service (or not serving), 2 usage error, 130 interrupted.",
    )
    _global_options(main_parser, main=True)
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, main=False)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("encode", encode, "Vectors of texts, of images given as @path, or of user or item ids.")
    sub.add_argument("inputs", nargs="+", metavar="INPUT", help="a text, or @path of an image file")
    sub.add_argument("--model", default="", help="model id (default: the gateway's for the inputs' kind)")
    sub.add_argument("--dimensions", type=int, default=0, help="keep the first N dimensions")
    ids = sub.add_mutually_exclusive_group()
    ids.add_argument("--users", action="store_true", help="the inputs are user ids (a user-item model's)")
    ids.add_argument("--items", action="store_true", help="the inputs are item ids (a user-item model's)")

    sub = command(
        "encode-bulk",
        encode_bulk,
        "Vectors of every item of a folder of images, a .txt file (one text per line) or a .csv file "
        "(columns id,text), through one stream, in order.",
    )
    sub.add_argument("path", type=Path, metavar="PATH")
    sub.add_argument("--model", default="", help="model id (default: the gateway's for the items' kind)")
    sub.add_argument("--dimensions", type=int, default=0, help="keep the first N dimensions")
    sub.add_argument("--batch", type=_positive, default=32, help="inputs per request (default %(default)s)")
    sub.add_argument(
        "--output",
        type=Path,
        default=None,
        help="save the vectors to this .npy file (rows: the items in order)",
    )

    sub = command("similarity", similarity, "Cosine similarity of a query and candidates (texts or @images).")
    sub.add_argument("query", help="a text, or @path of an image file")
    sub.add_argument("candidates", nargs="+", metavar="CANDIDATE", help="texts or @paths of image files")
    sub.add_argument("--space", default="", help="the space to compare in")

    sub = command("search", search, "Nearest indexed items to a text or an @image.")
    sub.add_argument("query", help="a text, or @path of an image file")
    sub.add_argument("-k", type=int, default=10, help="hits to return (default %(default)s)")
    sub.add_argument("--space", default="", help="the space to search (default: the query model's)")
    sub.add_argument("--model", default="", help="model that encodes the query")
    sub.add_argument(
        "--kind", action="append", default=[], choices=sorted(KINDS), help="only items of this kind"
    )
    sub.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only items whose payload has KEY=VALUE",
    )
    sub.add_argument(
        "--all-spaces",
        action="store_true",
        default=False,
        help="search every space where the query's kind has a model, fused by reciprocal rank",
    )

    sub = command(
        "hybrid",
        hybrid,
        "Indexed items near a text or an @image, mixed with what a user likes (a user-item model's vectors "
        "of the items with the same ids).",
    )
    sub.add_argument("query", help="a text, or @path of an image file")
    sub.add_argument("--user", required=True, help="the user whose taste mixes in")
    sub.add_argument(
        "--weight", type=float, default=None, help="weight of the user's part in [0, 1] (default 0.5)"
    )
    sub.add_argument(
        "--mix", choices=sorted(MIXES), default="rrf", help="how the two lists mix (default rrf)"
    )
    sub.add_argument("-k", type=int, default=10, help="hits to return (default %(default)s)")
    sub.add_argument("--space", default="", help="the content space (default: the query model's)")
    sub.add_argument("--model", default="", help="model that encodes the query")
    sub.add_argument("--useritem-model", default="", help="the user-item model (default: the gateway's)")
    sub.add_argument(
        "--candidates",
        type=int,
        default=0,
        help="the query's nearest items that are ranked (default: the gateway's)",
    )
    sub.add_argument(
        "--kind", action="append", default=[], choices=sorted(KINDS), help="only items of this kind"
    )
    sub.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only items whose payload has KEY=VALUE",
    )

    sub = command(
        "index",
        index,
        "Index a folder of images (id: relative path), a .txt file (one item per line, id FILE:LINE) or a "
        ".csv file (columns id,text; other columns go to the payload), resumably.",
    )
    sub.add_argument("path", type=Path, metavar="PATH")
    sub.add_argument("--space", default="", help="target space (default: the model's)")
    sub.add_argument("--model", default="", help="model that encodes the items (default: per kind)")
    sub.add_argument(
        "--batch", type=_positive, default=32, help="items per upsert request (default %(default)s)"
    )
    sub.add_argument(
        "--journal",
        type=Path,
        default=None,
        help=f"acknowledged ids (default: PATH{bulk.JOURNAL_SUFFIX} beside PATH)",
    )
    sub.add_argument("--restart", action="store_true", help="forget the journal: send every item again")

    sub = command(
        "delete", delete, "Remove items from a space by id (unknown ids are counted, not an error)."
    )
    sub.add_argument("ids", nargs="+", metavar="ID")
    sub.add_argument("--space", required=True, help="the space the items are in")

    sub = command("drop-space", drop_space, "Remove a space and every item in it, on every shard.")
    sub.add_argument("space", metavar="SPACE")
    sub.add_argument("--yes", action="store_true", help="yes, drop it (nothing is dropped without it)")

    sub = command("fit", fit, "Train a user-item model from a CSV of user_id,item_id,rating[,timestamp].")
    sub.add_argument("file", type=Path, metavar="FILE")
    sub.add_argument("--model", default="", help="the model to train (default: the worker's)")
    sub.add_argument("--implicit", action="store_true", help="interactions without ratings (ranking loss)")
    sub.add_argument(
        "--kind",
        choices=("", "ease", "mf"),
        default="",
        help="ease (ranks best), mf (predicts ratings); default: the worker's",
    )
    sub.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="a hyper-parameter of this Fit (l2, factors, epochs, learning_rate, patience, "
        "validation_fraction, seed), repeatable",
    )

    sub.add_argument(
        "--content",
        type=Path,
        metavar="CSV",
        help="item content, a CSV of item_id,text[,image] (image: a file path): an mf Fit learns a content "
        "map from it, for fold-in-items",
    )
    sub.add_argument(
        "--content-space", default="", help="the space to encode the content in (default: the text model's)"
    )

    sub = command("recommend", recommend, "Items for a known user.")
    sub.add_argument("user", metavar="USER")
    sub.add_argument("-k", type=int, default=10, help="items to return (default %(default)s)")
    sub.add_argument("--model", default="", help="the user-item model (default: the gateway's)")
    sub.add_argument("--include-seen", action="store_true", help="also items the user interacted with")
    sub.add_argument("--exclude", nargs="+", default=[], metavar="ITEM", help="items never to recommend")
    sub.add_argument("--candidates", nargs="+", default=[], metavar="ITEM", help="recommend only among these")
    sub.add_argument(
        "--fallback-below",
        type=int,
        default=0,
        metavar="N",
        help="a user with fewer than N interactions (an unknown one: 0) gets the most popular items, flagged",
    )

    sub = command("score", score, "The model's score of given items for a known user.")
    sub.add_argument("user", metavar="USER")
    sub.add_argument("items", nargs="+", metavar="ITEM")
    sub.add_argument("--model", default="", help="the user-item model (default: the gateway's)")

    sub = command("similar-items", similar_items, "Items closest to a known item (learnt item vectors).")
    sub.add_argument("item", metavar="ITEM")
    sub.add_argument("-k", type=int, default=10, help="items to return (default %(default)s)")
    sub.add_argument("--model", default="", help="the user-item model (default: the gateway's)")

    sub = command(
        "fold-in", fold_in, "Items for a new user from their ratings of known items, without retraining."
    )
    sub.add_argument("ratings", nargs="+", metavar="ITEM=RATING", help="a rating of a known item, e.g. 260=5")
    sub.add_argument("-k", type=int, default=10, help="items to return (default %(default)s)")
    sub.add_argument("--model", default="", help="the user-item model (default: the gateway's)")
    sub.add_argument("--include-seen", action="store_true", help="also the items rated here")

    sub = command(
        "fold-in-items",
        fold_in_items,
        "New items recommendable at once from their content (a text, or @path of an image), without retraining.",
    )
    sub.add_argument(
        "items",
        nargs="+",
        metavar="ITEM=CONTENT",
        help="e.g. 'tt01=A heist film (2024)' or 'tt02=@poster.jpg'",
    )
    sub.add_argument("--model", default="", help="the user-item model (default: the gateway's)")
    sub.add_argument(
        "--content-space", default="", help="the space of the content (default: the text model's)"
    )

    command("models", models, "The models behind the gateway.")

    sub = command("health", health, "grpc.health.v1 status; exit 0 only when SERVING.")
    sub.add_argument("--service", default="", help="a service name (default: the whole server)")
    return main_parser


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Output(args.json)
    try:
        timeouts = {"timeout_s": args.timeout, "stream_timeout_s": args.timeout} if args.timeout else {}
        with Client(
            args.address, token=args.token, tls=args.tls, ca=args.ca, cert=args.cert, key=args.key, **timeouts
        ) as client:
            return int(args.handler(client, args, out))
    except EmbeddingsError as error:
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
