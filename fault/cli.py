"""`suanli health ...` and `suanli ckpt ...`: the fault-tolerance commands."""

from __future__ import annotations


def add_health_parser(sub) -> None:
    # serve | status | events | agent; the code they drive lives in suanli.fault.health
    # and is imported only when a command runs.
    import os

    p = sub.add_parser("health", help="the cluster health daemon and its views")
    hs = p.add_subparsers(dest="health_command", required=True, metavar="HEALTH")
    addr_default = os.environ.get("SUANLI_HEALTH_ADDR") or "127.0.0.1:50051"
    token_default = os.environ.get("SUANLI_HEALTH_TOKEN_FILE")

    def client_args(q) -> None:
        q.add_argument("--addr", default=addr_default, help="daemon HOST:PORT (default: $SUANLI_HEALTH_ADDR or %(default)s)")
        q.add_argument("--token-file", default=token_default, help="file holding the daemon's token")
        q.add_argument("--tls-ca", help="CA certificate (PEM) when the daemon uses TLS")

    s = hs.add_parser("serve", help="run the health daemon in the foreground")
    s.add_argument("--bind", default="127.0.0.1:50051", help="gRPC HOST:PORT (default %(default)s)")
    s.add_argument("--metrics-bind", help="HOST:PORT for Prometheus /metrics (off unless given)")
    s.add_argument("--db", default="health.db", help="SQLite journal (default %(default)s)")
    s.add_argument("--token-file", default=token_default, help="require this bearer token (needed off loopback)")
    s.add_argument("--tls-cert", help="PEM certificate chain for TLS")
    s.add_argument("--tls-key", help="PEM private key for TLS")
    s.add_argument("--interval", type=float, default=1.0, help="reporters' heartbeat interval, s (default 1)")
    s.add_argument("--dead-after", type=float, default=0.0, help="dead timeout, s (default 3 x interval)")
    s.add_argument("--hang-floor", type=float, default=10.0, help="shortest hang budget, s (default 10)")
    s.add_argument("--detector", action="append", default=[], metavar="NAME=VALUE",
                   help="any DetectorConfig field, e.g. straggler_factor=2 (repeatable)")
    s.add_argument("--max-message-bytes", type=int, default=64 * 1024, help="largest accepted message (default 64 KiB)")
    s.add_argument("--max-members", type=int, default=200_000, help="most ranks + node agents tracked (default %(default)s)")
    s.add_argument("--journal-interval", type=float, default=2.0,
                   help="seconds between snapshots of every rank's state (events are journaled at once; default 2)")
    s.set_defaults(func=_health_serve)

    st = hs.add_parser("status", help="one line per rank and node agent: state, step, heartbeat age, step time, node")
    client_args(st)
    st.add_argument("--job", default="", help="only this job")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_health_status)

    ev = hs.add_parser("events", help="dead / hung / straggler / diverging / unhealthy / recovered events")
    client_args(ev)
    ev.add_argument("--job", default="", help="only this job")
    ev.add_argument("--since", type=int, default=0, metavar="ID", help="events after this id")
    ev.add_argument("--limit", type=int, default=0, help="only the newest N past events")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.set_defaults(func=_health_events)

    ag = hs.add_parser("agent", help="report this node's host and device health to the daemon; with --relay-bind, "
                                     "also relay the node's rank heartbeats to it on one stream")
    ag.add_argument("--addr", "--daemon", dest="addr", default=addr_default,
                    help="daemon HOST:PORT (default: $SUANLI_HEALTH_ADDR or %(default)s)")
    ag.add_argument("--token-file", default=token_default, help="file holding the daemon's token")
    ag.add_argument("--tls-ca", help="CA certificate (PEM) when the daemon uses TLS")
    ag.add_argument("--relay-bind", metavar="HOST:PORT",
                    help="serve Report here for this node's ranks (reporters: SUANLI_HEALTH_RELAY=HOST:PORT) and "
                         "forward their heartbeats in batches on one stream (off unless given)")
    ag.add_argument("--relay-window", type=float, default=0.005, metavar="SECONDS",
                    help="heartbeats arriving this close together go upstream as one batch (default %(default)s)")
    ag.add_argument("--node", help="node name (default: hostname)")
    ag.add_argument("--interval", type=float, default=1.0, help="seconds between reports (default 1)")
    ag.add_argument("--disk", default="/", help="filesystem whose free space is watched (default /)")
    ag.set_defaults(func=_health_agent)


def _health_serve(args) -> int:
    from suanli.fault.health.auth import read_token
    from suanli.fault.health.daemon import DaemonConfig, serve
    from suanli.fault.health.detectors import DetectorConfig

    detectors = DetectorConfig.from_pairs(args.detector, interval_s=args.interval, dead_after_s=args.dead_after,
                                          hang_floor_s=args.hang_floor)
    return serve(DaemonConfig(bind=args.bind, db=args.db, metrics_bind=args.metrics_bind,
                              token=read_token(args.token_file), tls_cert=args.tls_cert, tls_key=args.tls_key,
                              max_message_bytes=args.max_message_bytes, journal_interval_s=args.journal_interval,
                              max_members=args.max_members,
                              detectors=detectors))


def _health_client(args):
    from suanli.fault.health.auth import read_token
    from suanli.fault.health.client import HealthClient

    return HealthClient(args.addr, read_token(args.token_file), args.tls_ca)


def _health_status(args) -> int:
    import json

    from suanli.fault.health.client import format_status, member_dict

    with _health_client(args) as c:
        reply = c.status(args.job)
    if args.json:
        print(json.dumps({"server_time": reply.server_time_unix, "members": [member_dict(m) for m in reply.members]},
                         indent=2))
    else:
        print(format_status(reply))
    return 0


def _health_events(args) -> int:
    import json

    from suanli.fault.health.client import event_dict, format_event

    with _health_client(args) as c:
        for ev in c.events(args.since, args.job, args.follow, args.limit):
            print(json.dumps(event_dict(ev)) if args.json else format_event(ev), flush=True)
    return 0


def _health_agent(args) -> int:
    from suanli.fault.health.agent import run_agent_foreground
    from suanli.fault.health.auth import read_token

    return run_agent_foreground(addr=args.addr, node=args.node, interval_s=args.interval,
                                token=read_token(args.token_file), tls_ca=args.tls_ca, disk_path=args.disk,
                                relay_bind=args.relay_bind, relay_window=args.relay_window)


def add_ckpt_parser(sub) -> None:
    # ls | verify | convert live beside the checkpoint code they drive.
    from suanli.fault.checkpoint.cli import add_ckpt_parser as add

    add(sub)
