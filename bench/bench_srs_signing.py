"""Benchmark of SRS signing (issue 8): signed against unsigned, one table.

Micro: ``MessageCodec.encode`` then ``MessageCodec.open`` of one message,
timed per message (``--messages`` of each kind, after 500 untimed), by
codecs without a secret (unsigned: shape checks only) and with a secret
(HMAC-SHA256 over the inner text, AES-GCM sealed payload, freshness and
replay checks).  Kinds: a heartbeat, the ``instance_list`` request of
a listing, and its reply with ``--per-agent`` names (what each peer sends
in the macro part) and with 100 names.  Names are ``uuid4`` strings, as the
agent makes them.  The encoder and the opener are two codecs (two agents); the
unsigned and the signed pair take turns message by message.

Macro: ``GET /foo/instances/`` through two 3-agent clusters of real
``scs-agent`` processes on loopback (RabbitMQ on 127.0.0.1:5672), one
started without a secret, one with ``--cluster-secret-file`` (a file of 32
random characters, mode 0600); each cluster has its own ``--cluster`` name
made unique per run.  Every agent holds ``--per-agent`` instances of
``foo``, created ``?nowait=1`` and disabled at once, exactly as
``bench_cluster.py`` does (its ``Bench.populate``), so that no live workers
pile up.  Both clusters run at the same time and the timed listings go in
alternating blocks (``--block`` listings, order unsigned, signed, signed,
unsigned, ...), each rotating over the cluster's three agents on keep-alive
connections, so that a change of the machine's load during the run (other
test suites share these 2 CPUs) falls on both sides alike.

Goal (issue 8): signed listing p50 <= 1.10 x unsigned listing p50.

The "codec work per listing" row is the micro p50s (of encode and of open
separately; means are inflated by preemption when the machine is busy)
times the messages one 3-agent listing makes the codecs handle: one fanout
request encoded by the asker and opened by all three agents (the asker
opens its own copy before dropping it), two replies encoded by the peers
and opened by the asker.

Every agent started is stopped by pid (TERM, then KILL) and any worker left
is killed by its pid file, even on error (``bench_cluster.Bench.cleanup``).

Usage (from the repository root, with the virtualenv's Python):

    .venv/bin/python bench/bench_srs_signing.py [--messages 20000] [--requests 300]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_cluster import Bench  # noqa: E402
from bench.common import Run, add_output_arguments, exit_on_sigterm, percentile, table_head, wait_membership  # noqa: E402
from scs.srs_trust import MessageCodec  # noqa: E402

GOAL = 1.10  # signed listing p50 <= GOAL x unsigned
CLUSTER_SIZE = 3
WARMUP_MESSAGES = 500


# -- micro --------------------------------------------------------------------


def message_kinds(reply_names: int) -> list[tuple[str, str, str, dict[str, Any], dict[str, str]]]:
    """(label, type, to, payload, header) of the messages timed."""
    asker_queue = "scs.bench.agent1.0123456789abcdef"
    cid = uuid.uuid4().hex

    def reply(count: int) -> dict[str, Any]:
        return {"ok": True, "result": sorted(str(uuid.uuid4()) for _ in range(count))}

    return [
        (
            "heartbeat",
            "heartbeat",
            "*",
            {
                "url": "http://127.0.0.1:8080",
                "interval": 2.0,
                "summary": {"instances": 20},
                "hello": False,
                "token": False,
            },
            {},
        ),
        (
            "listing request (fanout)",
            "request",
            "*",
            {"op": "instance_list", "args": {"app": "foo"}},
            {"cid": cid, "reply_to": asker_queue},
        ),
        (f"listing reply, {reply_names} names", "reply", "agent1", reply(reply_names), {"re": cid}),
        ("listing reply, 100 names", "reply", "agent1", reply(100), {"re": cid}),
    ]


def time_codecs(
    secret: bytes, kind: str, to: str, payload: dict[str, Any], header: dict[str, str], count: int
) -> dict[str, dict[str, Any]]:
    """Per side: p50 and mean µs of encode + open, p50 µs of each, wire size.

    The two sides take turns message by message (which goes first
    alternates), so that a change of the machine's load falls on both."""
    clock = time.perf_counter_ns
    sides = {}
    for side, key in (("unsigned", None), ("signed", secret)):
        sides[side] = (
            MessageCodec("bench", key, clock=time.time),  # the sending agent's
            MessageCodec("bench", key, clock=time.time),  # the receiving agent's
            [],  # encode ns
            [],  # open ns
        )
    sizes = {}
    order = list(sides)
    for n in range(WARMUP_MESSAGES + count):
        for side in order:
            sender, receiver, encode_ns, open_ns = sides[side]
            t0 = clock()
            body = sender.encode(kind, "agent2", "incarnation-2", to, payload, **header)
            t1 = clock()
            message = receiver.open(body, me="agent1")
            t2 = clock()
            if n >= WARMUP_MESSAGES:
                encode_ns.append(t1 - t0)
                open_ns.append(t2 - t1)
            sizes[side] = len(body)
        order.reverse()
    stats = {}
    for side, (_sender, receiver, encode_ns, open_ns) in sides.items():
        assert not receiver.rejected, receiver.rejected
        total = [e + o for e, o in zip(encode_ns, open_ns, strict=True)]
        stats[side] = {
            "size": sizes[side],
            "p50": statistics.median(total) / 1000,
            "mean": statistics.fmean(total) / 1000,
            "encode": statistics.median(encode_ns) / 1000,
            "open": statistics.median(open_ns) / 1000,
        }
    assert message.payload == payload
    return stats


# -- the table ----------------------------------------------------------------


class Table:
    def __init__(self) -> None:
        self.lines = table_head(
            "measurement", "stat", "unsigned", "signed", "signed - unsigned", "signed / unsigned", "target", "result"
        )

    def row(
        self,
        what: str,
        stat: str,
        plain: float,
        signed: float,
        fmt: str = "{:.1f}",
        target: str = "",
        result: str = "",
    ) -> None:
        ratio = f"{signed / plain:.2f}" if plain else ""
        self.lines.append(
            f"| {what} | {stat} | {fmt.format(plain)} | {fmt.format(signed)} | "
            f"{fmt.format(signed - plain)} | {ratio} | {target} | {result} |"
        )

    def text(self) -> str:
        return "\n".join(self.lines)


# -- macro ----------------------------------------------------------------------


class SigningBench(Bench):
    """Two 3-agent clusters on bench_cluster's process helpers: agents 1-3
    unsigned, agents 4-6 signed."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(argparse.Namespace(per_agent=args.per_agent, agents=2 * CLUSTER_SIZE))
        self.secret_path = self.root / "cluster-secret"

    def write_secret(self) -> None:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        secret = "".join(secrets.choice(alphabet) for _ in range(32))
        fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")

    def start_cluster(self, first: int, name: str, *extra: str) -> list[Any]:
        agents = [self.start(i, "--cluster", name, *extra) for i in range(first, first + CLUSTER_SIZE)]
        wait_membership(agents, 30, interval=0.05)
        return agents


def macro(args: argparse.Namespace, bench: SigningBench, notes: list[str]) -> dict[str, dict[str, float]]:
    t0 = time.monotonic()
    for i in range(1, 2 * CLUSTER_SIZE + 1):
        bench.populate(i)
    print(
        f"  populated {2 * CLUSTER_SIZE} x {args.per_agent} in {time.monotonic() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    bench.write_secret()
    plain = bench.start_cluster(1, f"{bench.cluster}-plain")
    signed = bench.start_cluster(
        CLUSTER_SIZE + 1, f"{bench.cluster}-signed", "--cluster-secret-file", str(bench.secret_path)
    )
    for agent in plain:
        assert "messages NOT signed" in agent.log_text(), agent.log_path
    for agent in signed:
        assert "messages signed and encrypted" in agent.log_text(), agent.log_path
    expected = CLUSTER_SIZE * args.per_agent
    sides = {"unsigned": plain, "signed": signed}
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpu_ms: dict[str, float] = {side: 0.0 for side in sides}
    flagged = 0
    for agents in sides.values():  # untimed: connections, caches, JIT-free warm-up
        bench.listings(agents, expected, 1, warmup=20)
    blocks = -(-args.requests // args.block)
    for b in range(blocks):
        order = ["unsigned", "signed"] if b % 2 == 0 else ["signed", "unsigned"]
        for side in order:
            count = min(args.block, args.requests - len(times[side]))
            block_times, block_flagged, block_cpu = bench.listings(sides[side], expected, count, warmup=CLUSTER_SIZE)
            times[side].extend(block_times)
            cpu_ms[side] += block_cpu * count
            flagged += block_flagged
    assert flagged == 0, f"{flagged} listings named a missing agent"
    notes.append(
        f"macro: {len(times['unsigned'])} + {len(times['signed'])} listings of {expected} names "
        f"in {blocks} alternating blocks per side, clusters {bench.cluster}-plain and "
        f"{bench.cluster}-signed; no missing-agents header"
    )
    return {
        side: {
            "p50": statistics.median(t) * 1000,
            "p90": percentile(t, 90) * 1000,
            "mean": statistics.fmean(t) * 1000,
            "cpu": cpu_ms[side] / len(t),
        }
        for side, t in times.items()
    }


# -- main ---------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    table = Table()
    notes: list[str] = []
    run = Run()

    print(f"micro: {args.messages} messages of each kind, each side", file=sys.stderr, flush=True)
    secret = secrets.token_urlsafe(24).encode("ascii")
    micro: dict[str, dict[str, dict[str, Any]]] = {}
    for label, kind, to, payload, header in message_kinds(args.per_agent):
        micro[label] = time_codecs(secret, kind, to, payload, header, args.messages)
        m = micro[label]
        what = f"micro: encode + open, {label} ({m['unsigned']['size']} B / {m['signed']['size']} B)"
        table.row(what, "p50 µs", m["unsigned"]["p50"], m["signed"]["p50"])
        table.row(what, "mean µs", m["unsigned"]["mean"], m["signed"]["mean"])

    request = micro["listing request (fanout)"]
    reply = micro[f"listing reply, {args.per_agent} names"]

    def per_listing(side: str, cost: Callable[[dict[str, Any]], float]) -> float:
        return (
            request[side]["encode"] + CLUSTER_SIZE * request[side]["open"] + (CLUSTER_SIZE - 1) * cost(reply[side])
        ) / 1000

    codec_ms = {side: per_listing(side, lambda r: r["encode"] + r["open"]) for side in ("unsigned", "signed")}
    table.row(
        f"codec work per {CLUSTER_SIZE}-agent listing (micro p50s: 1 request encoded, "
        f"{CLUSTER_SIZE} opened; {CLUSTER_SIZE - 1} replies of {args.per_agent} names encoded and opened)",
        "CPU ms",
        codec_ms["unsigned"],
        codec_ms["signed"],
        fmt="{:.3f}",
    )

    if not args.no_macro:
        bench = SigningBench(args)
        print(
            f"macro: root {bench.root}, clusters {bench.cluster}-plain/-signed",
            file=sys.stderr,
            flush=True,
        )
        with run.guard(bench.root, bench.cleanup, keep=args.keep):
            result = macro(args, bench, notes)
        plain, signed = result["unsigned"], result["signed"]
        what = f"macro: GET /foo/instances/, {CLUSTER_SIZE} agents, {CLUSTER_SIZE * args.per_agent} names"
        ok = signed["p50"] <= GOAL * plain["p50"]
        table.row(
            what,
            "p50 ms",
            plain["p50"],
            signed["p50"],
            target=f"signed <= {GOAL:.2f} x unsigned = {GOAL * plain['p50']:.1f} ms",
            result="PASS" if ok else "FAIL",
        )
        table.row(what, "p90 ms", plain["p90"], signed["p90"])
        table.row(what, "mean ms", plain["mean"], signed["mean"])
        table.row(what, "agents' CPU ms/listing", plain["cpu"], signed["cpu"])
        extra_codec = codec_ms["signed"] - codec_ms["unsigned"]
        notes.append(
            f"signing adds {extra_codec:.3f} ms of codec CPU per listing (micro), "
            f"{signed['cpu'] - plain['cpu']:+.2f} ms of agents' CPU measured, "
            f"{signed['p50'] - plain['p50']:+.2f} ms to the p50"
        )

    print(table.text())
    for note in notes:
        print(f"- {note}")
    print(
        f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; python {sys.version.split()[0]}; "
        + run.load(", shared with other engineers' test runs")
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="timed messages of each kind, each side")
    parser.add_argument("--requests", type=int, default=300, help="timed listings, each side")
    parser.add_argument("--block", type=int, default=50, help="listings per alternating block")
    parser.add_argument("--per-agent", type=int, default=20, help="instances of foo per agent")
    parser.add_argument("--no-macro", action="store_true", help="only the codec (no agents)")
    add_output_arguments(parser, write=False)
    args = parser.parse_args()
    if args.messages < 1 or args.requests < 1 or args.block < 1 or args.per_agent < 0:
        parser.error("--messages, --requests and --block must be positive, --per-agent >= 0")

    exit_on_sigterm()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
