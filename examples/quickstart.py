"""Encode two sentences and compare them through the running gateway (`make run` first)."""

import grpc
import numpy as np
from embeddings.v1 import encoder_pb2, gateway_pb2, gateway_pb2_grpc, types_pb2

with grpc.insecure_channel("localhost:50051") as channel:
    gateway = gateway_pb2_grpc.GatewayStub(channel)

    response = gateway.Encode(
        encoder_pb2.EncodeRequest(
            model="all-MiniLM-L6-v2",
            inputs=[types_pb2.Input(text="A cat sits on the mat."), types_pb2.Input(text="Stocks fell.")],
        ),
        timeout=10,
    )
    vectors = np.stack([np.frombuffer(e.vector.data, dtype="<f4") for e in response.embeddings])
    print(response.model.id, response.model.version, vectors.shape, [e.cached for e in response.embeddings])

    scores = gateway.Similarity(
        gateway_pb2.SimilarityRequest(
            queries=[types_pb2.Input(text="a kitten")],
            candidates=[types_pb2.Input(text="A cat sits on the mat."), types_pb2.Input(text="Stocks fell.")],
        ),
        timeout=10,
    )
    print("similarity:", [round(s, 3) for s in scores.scores])
