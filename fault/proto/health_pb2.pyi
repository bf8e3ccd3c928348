from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_DATA: _ClassVar[Phase]
    PHASE_FORWARD: _ClassVar[Phase]
    PHASE_BACKWARD: _ClassVar[Phase]
    PHASE_OPTIMIZER: _ClassVar[Phase]
    PHASE_CHECKPOINT: _ClassVar[Phase]
    PHASE_IDLE: _ClassVar[Phase]
    PHASE_DONE: _ClassVar[Phase]

class CommandKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_UNSPECIFIED: _ClassVar[CommandKind]
    COMMAND_DUMP_STACKS: _ClassVar[CommandKind]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_DEAD: _ClassVar[EventKind]
    EVENT_HUNG: _ClassVar[EventKind]
    EVENT_STRAGGLER: _ClassVar[EventKind]
    EVENT_DIVERGING: _ClassVar[EventKind]
    EVENT_UNHEALTHY: _ClassVar[EventKind]
    EVENT_RECOVERED: _ClassVar[EventKind]
PHASE_UNSPECIFIED: Phase
PHASE_DATA: Phase
PHASE_FORWARD: Phase
PHASE_BACKWARD: Phase
PHASE_OPTIMIZER: Phase
PHASE_CHECKPOINT: Phase
PHASE_IDLE: Phase
PHASE_DONE: Phase
COMMAND_UNSPECIFIED: CommandKind
COMMAND_DUMP_STACKS: CommandKind
EVENT_UNSPECIFIED: EventKind
EVENT_DEAD: EventKind
EVENT_HUNG: EventKind
EVENT_STRAGGLER: EventKind
EVENT_DIVERGING: EventKind
EVENT_UNHEALTHY: EventKind
EVENT_RECOVERED: EventKind

class DeviceHealth(_message.Message):
    __slots__ = ("index", "name", "temperature_c", "power_w", "utilization_pct", "memory_used_bytes", "memory_total_bytes", "ecc_errors_corrected", "ecc_errors_uncorrected", "source")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ECC_ERRORS_CORRECTED_FIELD_NUMBER: _ClassVar[int]
    ECC_ERRORS_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    temperature_c: float
    power_w: float
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int
    ecc_errors_corrected: int
    ecc_errors_uncorrected: int
    source: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ..., utilization_pct: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., ecc_errors_corrected: _Optional[int] = ..., ecc_errors_uncorrected: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class HostMetrics(_message.Message):
    __slots__ = ("cpu_percent", "memory_used_bytes", "memory_total_bytes", "disk_path", "disk_free_bytes", "disk_total_bytes", "load1")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_PATH_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_path: str
    disk_free_bytes: int
    disk_total_bytes: int
    load1: float
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., disk_path: _Optional[str] = ..., disk_free_bytes: _Optional[int] = ..., disk_total_bytes: _Optional[int] = ..., load1: _Optional[float] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("job", "rank", "world_size", "node", "pid", "step", "phase", "loss", "grad_norm", "step_time_s", "tokens_per_s", "mfu", "collectives", "nan_count", "spike_count", "devices", "host", "run_dir", "seq", "sent_unix", "dumped_id", "dump_path", "ack")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MFU_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SPIKE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    DUMPED_ID_FIELD_NUMBER: _ClassVar[int]
    DUMP_PATH_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    node: str
    pid: int
    step: int
    phase: Phase
    loss: float
    grad_norm: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    collectives: int
    nan_count: int
    spike_count: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceHealth]
    host: HostMetrics
    run_dir: str
    seq: int
    sent_unix: float
    dumped_id: int
    dump_path: str
    ack: bool
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., node: _Optional[str] = ..., pid: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., step_time_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., mfu: _Optional[float] = ..., collectives: _Optional[int] = ..., nan_count: _Optional[int] = ..., spike_count: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceHealth, _Mapping]]] = ..., host: _Optional[_Union[HostMetrics, _Mapping]] = ..., run_dir: _Optional[str] = ..., seq: _Optional[int] = ..., sent_unix: _Optional[float] = ..., dumped_id: _Optional[int] = ..., dump_path: _Optional[str] = ..., ack: _Optional[bool] = ...) -> None: ...

class NodeHeartbeat(_message.Message):
    __slots__ = ("node", "pid", "devices", "host", "seq", "sent_unix", "leaving")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    node: str
    pid: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceHealth]
    host: HostMetrics
    seq: int
    sent_unix: float
    leaving: bool
    def __init__(self, node: _Optional[str] = ..., pid: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceHealth, _Mapping]]] = ..., host: _Optional[_Union[HostMetrics, _Mapping]] = ..., seq: _Optional[int] = ..., sent_unix: _Optional[float] = ..., leaving: _Optional[bool] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("kind", "id", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: CommandKind
    id: int
    reason: str
    def __init__(self, kind: _Optional[_Union[CommandKind, str]] = ..., id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("seq", "commands", "interval_s", "job", "rank")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    seq: int
    commands: _containers.RepeatedCompositeFieldContainer[Command]
    interval_s: float
    job: str
    rank: int
    def __init__(self, seq: _Optional[int] = ..., commands: _Optional[_Iterable[_Union[Command, _Mapping]]] = ..., interval_s: _Optional[float] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class HeartbeatBatch(_message.Message):
    __slots__ = ("heartbeats", "node", "seq", "sent_unix", "ack")
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    heartbeats: _containers.RepeatedCompositeFieldContainer[Heartbeat]
    node: NodeHeartbeat
    seq: int
    sent_unix: float
    ack: bool
    def __init__(self, heartbeats: _Optional[_Iterable[_Union[Heartbeat, _Mapping]]] = ..., node: _Optional[_Union[NodeHeartbeat, _Mapping]] = ..., seq: _Optional[int] = ..., sent_unix: _Optional[float] = ..., ack: _Optional[bool] = ...) -> None: ...

class ReportBatchReply(_message.Message):
    __slots__ = ("seq", "replies", "interval_s")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    seq: int
    replies: _containers.RepeatedCompositeFieldContainer[ReportReply]
    interval_s: float
    def __init__(self, seq: _Optional[int] = ..., replies: _Optional[_Iterable[_Union[ReportReply, _Mapping]]] = ..., interval_s: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "time_unix", "kind", "job", "rank", "node", "message", "detail_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    time_unix: float
    kind: EventKind
    job: str
    rank: int
    node: str
    message: str
    detail_json: str
    def __init__(self, id: _Optional[int] = ..., time_unix: _Optional[float] = ..., kind: _Optional[_Union[EventKind, str]] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., node: _Optional[str] = ..., message: _Optional[str] = ..., detail_json: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("job", "rank", "node", "pid", "state", "conditions", "step", "phase", "heartbeat_age_s", "step_time_s", "tokens_per_s", "mfu", "loss", "collectives")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MFU_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    node: str
    pid: int
    state: str
    conditions: _containers.RepeatedScalarFieldContainer[str]
    step: int
    phase: Phase
    heartbeat_age_s: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    loss: float
    collectives: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., node: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., conditions: _Optional[_Iterable[str]] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., heartbeat_age_s: _Optional[float] = ..., step_time_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., mfu: _Optional[float] = ..., loss: _Optional[float] = ..., collectives: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("server_time_unix", "members")
    SERVER_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    server_time_unix: float
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    def __init__(self, server_time_unix: _Optional[float] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("job", "since_id", "follow", "limit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SINCE_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    since_id: int
    follow: bool
    limit: int
    def __init__(self, job: _Optional[str] = ..., since_id: _Optional[int] = ..., follow: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...
