"""Encryption benchmark: replicating 1 GiB (4 files of 256 MiB) between two `backer` processes
on loopback, encrypted (folders shared with a key: Noise handshake, AES-GCM records) against
plaintext (the same folders without a key), in one run; plus the handshake time.

Each run: the serving side holds the data, already indexed; the client folder is empty; the
figure is the `backer sync` client process from start to exit (it scans its empty folder,
handshakes, pulls everything, verifies every chunk, fsyncs, and exits in sync). Target from the
security issue: encryption costs under 25 %.

    python bench/encryption_bench.py            # full run; writes "## Encryption" in docs
    python bench/encryption_bench.py --quick    # smoke run (16 MiB), writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import (
    LARGE,
    QUICK_LARGE,
    DatasetSpec,
    Row,
    backer_command,
    ensure_dataset,
    free_port,
    machine,
    markdown_table,
    median,
    text_table,
    utc_date,
    wait_for_quiet,
    write_doc_section,
)
from crypto_bench import handshake_time
from measure import (
    run_measured,
)

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
COMMAND = "python bench/encryption_bench.py"


@dataclass(frozen=True, slots=True)
class Plan:
    data: DatasetSpec
    runs: int
    quiet_wait: float


FULL = Plan(
    LARGE,
    runs=3,
    quiet_wait=30,
)
QUICK = Plan(
    QUICK_LARGE,
    runs=1,
    quiet_wait=0,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no docs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/backer-bench"))
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    work = args.workdir / "encryption"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = ensure_dataset(args.workdir, plan.data)
    volume = data.total_bytes

    times: dict[str, list[float]] = {"plaintext": [], "encrypted": []}
    for mode in ("plaintext", "encrypted"):
        wait_for_quiet(plan.quiet_wait)
        with serving(work / mode, data.root, encrypted=mode == "encrypted") as (address, key):
            for run in range(plan.runs):
                times[mode].append(pull_once(work / mode / f"client{run}", address, key))
    plain, secret = median(times["plaintext"]), median(times["encrypted"])
    cost = secret / plain - 1
    handshake = handshake_time("AESGCM", 50 if args.quick else 500)
    rows = [
        Row(
            measure=f"replicate {volume / 2**30:.2f} GiB in {len(data.files)} files, wall",
            backer=f"encrypted {volume / secret / 1e9:.2f} GB/s ({secret:.2f} s)",
            reference=f"plaintext {volume / plain / 1e9:.2f} GB/s ({plain:.2f} s)",
            ratio=f"{secret / plain:.2f}x",
            target="encryption costs < 25 %",
            met="yes" if cost < 0.25 else "**no**",
        ),
        Row(
            measure="handshake, both sides, sans-IO (Noise XXpsk3 + identities, AES-GCM)",
            backer=f"{handshake * 1e3:.2f} ms",
            reference="-",
            ratio="-",
        ),
    ]
    print(text_table(rows))
    print(f"runs, seconds: {times}")
    if not args.quick:
        write_doc_section(DOC, "Encryption", report(rows, times, volume))
    return 0


@contextlib.contextmanager
def serving(base: Path, data: Path, *, encrypted: bool) -> Iterator[tuple[str, str | None]]:
    """A `backer serve` process over a hard-linked copy of `data` (indexed before it listens);
    yields its address and, when encrypted, the folder key clients join with."""
    folder = base / "server"
    base.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(data), str(folder)], check=True)
    shutil.rmtree(folder / ".backer", ignore_errors=True)
    home = base / "server-home"
    key = None
    if encrypted:
        out = subprocess.run(
            backer_command(home, "init", str(folder)), check=True, capture_output=True, text=True
        ).stdout
        key = next(line.strip() for line in out.splitlines() if line.strip().startswith("bkw1"))
    port = free_port()
    server = subprocess.Popen(
        backer_command(home, "serve", str(folder), "--listen", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        if not ready.startswith("serving"):
            raise RuntimeError(f"backer serve did not start: {ready!r}")
        yield f"127.0.0.1:{port}", key
    finally:
        server.terminate()
        server.wait(timeout=60)


def pull_once(client: Path, address: str, key: str | None) -> float:
    """Seconds for `backer sync` to bring an empty folder in sync with the server."""
    home = client.with_name(client.name + "-home")
    if key is None:
        client.mkdir(parents=True)
    else:
        subprocess.run(
            backer_command(home, "join", key, str(client)), check=True, capture_output=True
        )
    started = time.perf_counter()
    measured = run_measured(backer_command(home, "sync", str(client), address, "--json"))
    wall = time.perf_counter() - started
    if b'"in_sync": true' not in measured.stdout:
        raise RuntimeError(f"sync did not end in sync: {measured.stdout!r} {measured.stderr!r}")
    shutil.rmtree(client, ignore_errors=True)
    return min(wall, measured.wall) if measured.wall > 0 else wall


def report(rows: list[Row], times: dict[str, list[float]], volume: int) -> str:
    return "\n".join(
        [
            f"Measured {utc_date()} on {machine()}.",
            "",
            f"Command: `{COMMAND}` (two `backer` processes on loopback; the serving folder is a "
            "hard-linked copy of the scan benchmark's `large` dataset, indexed before it listens; "
            "each client run starts from an empty folder and ends when `backer sync` exits in "
            "sync; median of 3 runs per mode). Encrypted = both folders shared with one folder "
            "key (Noise XXpsk3 handshake, AES-GCM records); plaintext = the same without a key.",
            "",
            markdown_table(rows),
            "",
            f"All runs, seconds: plaintext {times['plaintext']}, encrypted {times['encrypted']} "
            f"({volume / 2**20:.0f} MiB each).",
            "",
            f"Record encryption alone runs at about 1.4 GB/s encrypt+decrypt on one core "
            f"(`python bench/crypto_bench.py`); the plaintext sync moved "
            f"{volume / median(times['plaintext']) / 1e9:.2f} GB/s, so the cipher is a minor "
            "share of a sync's time. The rest, from profiles of both processes: fsync of the "
            "assembled files (about 2 s per GiB on this VM's disk; rsync does not fsync), one "
            "request and one verified answer per chunk (about 22,000 per GiB, each hashed on "
            "both sides), and the writes.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
