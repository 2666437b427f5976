"""What the text model alone costs, in this process, with no server: the ceiling that no serving code on
this machine can pass.

The default sentence model (all-MiniLM-L6-v2, ONNX Runtime fp32, the worker's own backend and its token
ids) encodes the side-by-side corpus (2000 sentences of 8-20 words, ../shared/peer_bench/sentences.py) in
three ways, alternating, for several rounds:

  worker      batches of 32 random corpus sentences, each run as the worker's batcher runs it (groups of
              similar length, by_length), on one model thread with one intra-op thread per core
  two lanes   the same batches on two model threads at once (TEXT_ONNX_LANES=2)
  sorted      the whole corpus sorted by length, in batches of 32 neighbours (no padding at all: the most
              favourable case, which no server sees)

and prints, per way, sentences per second, the CPU this process used (cores) and the CPU per sentence,
medians over the rounds, each over `worker` (the baseline) measured in the same rounds. The CPU per
sentence bounds what any server can do on these cores: requests/s <= cores / (model CPU per sentence +
everything else per request).
"""

import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable

from common import arguments

from harness.processes import ROOT

sys.path.insert(0, str(ROOT.parent / "shared" / "peer_bench"))

BATCH = 32


def measure(run: Callable[[], int], seconds: float) -> dict[str, float]:
    """Call `run` (returns sentences encoded) until `seconds` have passed; rate and CPU of this process."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sentences = 0
    while time.perf_counter() - wall0 < seconds:
        sentences += run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "sent_per_s": sentences / wall,
        "cores": cpu / wall,
        "cpu_ms_per_sentence": 1000 * cpu / sentences,
    }


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="of each way in each round")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/embeddings"))
    args = parser.parse_args()

    from embeddings.v1 import types_pb2 as pb
    from sentences import make_sentences

    from services.encoder.batching import CALL_COST_TOKENS, by_length
    from services.text.backends.sentence_onnx import OnnxSentenceBackend

    backend = OnnxSentenceBackend("", "all-MiniLM-L6-v2", "minilm", 50_000, args.cache_dir, 0, lanes=2)
    card = backend.load()
    corpus = [
        backend.prepare([pb.Input(text=text)], strict=False)[0] for text in make_sentences(2000, seed=1234)
    ]
    ordered = sorted(corpus, key=lambda item: item.tokens)
    generator = random.Random(7)
    lock = threading.Lock()

    def worker_batch() -> int:
        with lock:
            batch = generator.sample(corpus, BATCH)
        for group in by_length([item.tokens for item in batch], CALL_COST_TOKENS):
            backend.encode([batch[i] for i in group])
        return BATCH

    def two_lanes() -> int:
        counts = [0, 0]

        def lane(k: int) -> None:
            counts[k] = worker_batch()

        threads = [threading.Thread(target=lane, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts)

    position = [0]

    def sorted_batch() -> int:
        start = position[0] % len(ordered)
        backend.encode(ordered[start : start + BATCH])
        position[0] = start + BATCH
        return len(ordered[start : start + BATCH])

    ways = {"worker": worker_batch, "two lanes": two_lanes, "sorted": sorted_batch}
    print(
        f"{card.id} ({card.description}), {os.cpu_count()} cores; {args.rounds} rounds of {args.seconds:.0f} s"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for run in ways.values():
        run()  # warm up each way once
    for round_ in range(args.rounds):
        order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
        for name in order:
            results[name].append(measure(ways[name], args.seconds))
            row = results[name][-1]
            print(
                f"round {round_ + 1}  {name:<9}  {row['sent_per_s']:6.1f} sent/s  {row['cores']:.2f} cores  "
                f"{row['cpu_ms_per_sentence']:.2f} ms CPU/sentence",
                flush=True,
            )
    print("\nmedians; ratio: over `worker` in the same rounds (sentences/s)")
    print("| way | sent/s | cores | ms CPU per sentence | ratio |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        ratio = statistics.median(
            row["sent_per_s"] / base["sent_per_s"] for row, base in zip(rows, results["worker"], strict=True)
        )
        print(
            f"| {name} | {statistics.median(r['sent_per_s'] for r in rows):.1f} "
            f"| {statistics.median(r['cores'] for r in rows):.2f} "
            f"| {statistics.median(r['cpu_ms_per_sentence'] for r in rows):.2f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
