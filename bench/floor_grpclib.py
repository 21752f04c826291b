"""The no-op floor of floor_extproc.py on another gRPC transport: grpclib (HTTP/2 in Python,
on the event loop) instead of grpc.aio (gRPC's C core with its own threads). Same answers
(floor_extproc.Floor), same rendered Envoy config. For bench/transport_spike.py only: the
gateway itself runs on grpc.aio.

    python bench/floor_grpclib.py unix:///path/extproc-0.sock
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor_extproc import Floor, ep  # noqa: E402

from grpclib.const import Cardinality, Handler  # noqa: E402
from grpclib.health.service import Health  # noqa: E402
from grpclib.server import Server, Stream  # noqa: E402


class FloorService:
    async def process(self, stream: Stream[ep.ProcessingRequest, ep.ProcessingResponse]) -> None:
        floor = Floor()
        async for req in stream:
            await stream.send_message(floor.answer(req))
            if floor.last(req):
                return

    def __mapping__(self) -> dict[str, Any]:
        return {"/envoy.service.ext_proc.v3.ExternalProcessor/Process":
                Handler(self.process, Cardinality.STREAM_STREAM, ep.ProcessingRequest, ep.ProcessingResponse)}


async def serve(address: str) -> None:
    path = address.removeprefix("unix://")
    Path(path).unlink(missing_ok=True)
    server = Server([FloorService(), Health()])
    await server.start(path=path)
    await server.wait_closed()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(sys.argv[1]))
