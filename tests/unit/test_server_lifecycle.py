"""What every service's server does with the calls and connections it holds (services/common/server.py and
limits.py), on real in-process grpc.aio servers: calls still running when the shutdown grace ends are ended
UNAVAILABLE, and connections older than *_MAX_CONNECTION_AGE_S are asked to reconnect."""

import asyncio

import grpc
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.interceptor import StatusInterceptor
from services.common.limits import CallLimits
from services.common.server import _server_options
from services.gateway.settings import GatewaySettings


class _Held(enc_grpc.EncoderServicer):
    """Encode waits: request_id "quick" until `release` is set, any other until it is cancelled."""

    def __init__(self) -> None:
        self.started = 0
        self.both_started = asyncio.Event()
        self.release = asyncio.Event()

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        self.started += 1
        if self.started == 2:
            self.both_started.set()
        if request.request_id == "quick":
            await self.release.wait()
        else:
            await asyncio.Event().wait()
        return enc.EncodeResponse(request_id=request.request_id)


# Long enough for the quick call to finish once released (one turn of this process's loop) on a loaded
# machine; the held call waits all of it.
GRACE_S = 3.0


async def test_calls_running_when_the_grace_ends_are_ended_unavailable_and_the_rest_finish() -> None:
    limits = CallLimits("test", "TEST_", 0, 0, 0.0, trust_named_callers=True)
    servicer = _Held()
    server = grpc.aio.server(interceptors=[StatusInterceptor("test"), limits])
    enc_grpc.add_EncoderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = enc_grpc.EncoderStub(channel)
            quick = asyncio.ensure_future(stub.Encode(enc.EncodeRequest(request_id="quick"), timeout=60))
            held = asyncio.ensure_future(stub.Encode(enc.EncodeRequest(request_id="held"), timeout=60))
            await asyncio.wait_for(servicer.both_started.wait(), 10)
            ending = asyncio.ensure_future(limits.end_calls(GRACE_S))
            await asyncio.sleep(0)
            servicer.release.set()  # within the grace: the quick call finishes as usual
            assert (await asyncio.wait_for(quick, 30)).request_id == "quick"
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(held, 30)
            await asyncio.wait_for(ending, 30)
    finally:
        await server.stop(None)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
    assert "shutting down" in (ended.value.details() or "")
    assert "retry it on another instance" in (ended.value.details() or "")


AGE_S = 0.5
# gRPC jitters the age by up to 10 %; the margin covers a loaded machine.
AGE_MARGIN_S = 20.0


async def test_a_connection_older_than_max_connection_age_is_asked_to_reconnect() -> None:
    settings = GatewaySettings(max_connection_age_s=AGE_S, shutdown_grace_s=1.0)
    server = grpc.aio.server(options=_server_options(settings))
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # The server's GOAWAY closes the connection: the channel leaves READY (to IDLE: it reconnects,
            # re-resolving its target, at its next call) while nothing else happens on it.
            await asyncio.wait_for(
                channel.wait_for_state_change(grpc.ChannelConnectivity.READY), AGE_S * 1.1 + AGE_MARGIN_S
            )
            assert channel.get_state() != grpc.ChannelConnectivity.READY
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert (await check).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)
