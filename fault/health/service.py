"""The Health gRPC service (grpc.aio): heartbeats in, commands and events out.

A bad message ends only its own call, with a status naming the field; the daemon keeps
serving everyone else.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError

from suanli.fault.health.engine import Engine, TooManyMembers
from suanli.fault.health.validate import check_batch, check_heartbeat, check_node_heartbeat
from suanli.fault.proto import health_pb2 as pb
from suanli.fault.proto import health_pb2_grpc as pbg

WATCH_QUEUE = 10_000   # events buffered per watcher before it is cut off as too slow
BAD = grpc.StatusCode.INVALID_ARGUMENT


class Malformed:
    """What a request that does not parse becomes, so the handler can answer
    INVALID_ARGUMENT itself (a deserializer that raises makes gRPC say UNKNOWN)."""

    def __init__(self, cls, err: Exception) -> None:
        self.message = f"malformed {cls.__name__} message ({err}); send a serialized suanli.health.v1.{cls.__name__}"


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return Malformed(cls, e)
    return parse


_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_to_server(servicer: "HealthService", server) -> None:
    """Like the generated add_HealthServicer_to_server, with parse errors kept in our hands."""
    svc = pb.DESCRIPTOR.services_by_name["Health"]
    handlers = {m.name: _HANDLERS[(m.client_streaming, m.server_streaming)](
        getattr(servicer, m.name), request_deserializer=_parser(getattr(pb, m.input_type.name)),
        response_serializer=getattr(pb, m.output_type.name).SerializeToString) for m in svc.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(svc.full_name, handlers),))
    server.add_registered_method_handlers(svc.full_name, handlers)


class HealthService(pbg.HealthServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.interval_s = engine.cfg.interval_s

    async def Report(self, request_iterator, context):
        engine, interval = self.engine, self.interval_s
        async for hb in request_iterator:
            err = hb.message if type(hb) is Malformed else check_heartbeat(hb)
            if err:
                await context.abort(BAD, err)
            try:
                cmds = engine.heartbeat(hb)
            except TooManyMembers as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            # Replies only when there is something to say: halves the per-heartbeat cost.
            if cmds or hb.ack:
                yield pb.ReportReply(seq=hb.seq, commands=cmds, interval_s=interval)

    async def ReportBatch(self, request_iterator, context):
        """A node relay's stream: every heartbeat goes through the same engine path as on
        Report; a relay is not a member (its optional node heartbeat is the node's)."""
        engine, interval = self.engine, self.interval_s
        heartbeat, Reply = engine.heartbeat, pb.ReportReply
        async for batch in request_iterator:
            # The whole batch is checked before any of it is applied: a bad one changes nothing.
            err = batch.message if type(batch) is Malformed else check_batch(batch)
            if err:
                await context.abort(BAD, err)
            replies = []
            try:
                if batch.HasField("node"):
                    engine.node_heartbeat(batch.node)
                for hb in batch.heartbeats:
                    cmds = heartbeat(hb)
                    if cmds or hb.ack:
                        replies.append(Reply(seq=hb.seq, commands=cmds, interval_s=interval, job=hb.job, rank=hb.rank))
            except TooManyMembers as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            if replies or batch.ack:
                yield pb.ReportBatchReply(seq=batch.seq, replies=replies, interval_s=interval)

    async def ReportOnce(self, hb, context):
        err = hb.message if type(hb) is Malformed else check_heartbeat(hb)
        if err:
            await context.abort(BAD, err)
        try:
            cmds = self.engine.heartbeat(hb)
        except TooManyMembers as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return pb.ReportReply(seq=hb.seq, commands=cmds, interval_s=self.interval_s)

    async def ReportNode(self, nhb, context):
        err = nhb.message if type(nhb) is Malformed else check_node_heartbeat(nhb)
        if err:
            await context.abort(BAD, err)
        try:
            self.engine.node_heartbeat(nhb)
        except TooManyMembers as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return pb.ReportReply(seq=nhb.seq, interval_s=self.interval_s)

    async def Status(self, request, context):
        if type(request) is Malformed:
            await context.abort(BAD, request.message)
        # Off the event loop: 10,000 members take ~0.1 s to list, which heartbeats must
        # not wait for (status only reads; values may be a heartbeat newer, never torn).
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.status, request.job)

    async def Watch(self, request, context):
        if type(request) is Malformed:
            await context.abort(BAD, request.message)
        engine, job = self.engine, request.job
        queue: asyncio.Queue = asyncio.Queue(maxsize=WATCH_QUEUE)
        overflow = []

        def listener(ev: pb.Event) -> None:
            if job and ev.job != job:
                return
            try:
                queue.put_nowait(ev)
            except asyncio.QueueFull:
                overflow.append(ev.id)

        # Subscribe and snapshot memory in one step (no await between), so no event falls
        # between the history and the live tail.
        if request.follow:
            engine.listeners.append(listener)
        try:
            recent, first_in_memory = engine.recent(request.since_id, job)
            older = []
            if request.since_id + 1 < first_in_memory and engine.store is not None:
                older = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: engine.store.events(request.since_id, first_in_memory, job, request.limit))
            history = older + recent
            if request.limit:
                history = history[-request.limit:]
            last = request.since_id
            for ev in history:
                yield ev
                last = ev.id
            while request.follow:
                ev = await queue.get()
                if overflow:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"watcher fell {WATCH_QUEUE} events behind; reconnect with since_id={last}")
                if ev.id > last:
                    yield ev
                    last = ev.id
        finally:
            if listener in engine.listeners:
                engine.listeners.remove(listener)
