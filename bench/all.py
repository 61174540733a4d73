"""One command for the figures of docs/benchmarks.md: runs, one after another, the benchmarks
whose full runs fit together in 15 minutes on a 2-core machine, each rewriting its own section,
then records what ran and how long it took in the "Reproducing" section.

    python3 bench/all.py               # from the repository root, as root on a fresh machine
    python3 bench/all.py --list        # what would run, and what is left out and why

From a clean checkout it installs what it needs: without an importable `backer` it creates
`.venv` in the repository, installs backer there (`pip install -e .`) and runs itself again
with that interpreter; rsync, syncthing and b3sum come from Debian's packages (apt-get) and
py-spy from pip, each only where missing (`bench/compare.py` sees to it).

Three benchmarks are left out, as they would take the whole past 15 minutes (sync_bench 5.3
minutes, node_bench and discovery_bench about 7 each); `--everything` runs them too, so that one
command reproduces every section (about 23 minutes). Their commands and the reason are listed
in the "Reproducing" section and below (`LEFT_OUT`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import venv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "Reproducing"
BUDGET_MINUTES = 15


@dataclass(frozen=True, slots=True)
class Step:
    script: str
    args: tuple[str, ...]
    section: str  # the section of docs/benchmarks.md it rewrites
    minutes: float  # a full run's length on the reference machine, for --list

    def command(self) -> str:
        return " ".join(["python", f"bench/{self.script}", *self.args])


# Minutes measured for full runs on the reference machine (2 cores, the test suite running
# beside them): 1.9 and 1.3; sync_bench 5.3, node_bench and discovery_bench about 7 each.
# compare.py took 24 minutes quiet on 2026-12-08 with --no-profile (Syncthing alone spends
# ~10 of them on the 100,000-file tree); the py-spy reruns add to it.
STEPS = (
    Step("compare.py", (), "Side by side", 30.0),
    Step("scan_bench.py", (), "Scan", 1.9),
    Step("encryption_bench.py", (), "Encryption", 1.3),
)
# The longer ones, run only with --everything: (step, why it is not part of the default run)
LEFT_OUT = (
    (
        Step("sync_bench.py", (), "Sync", 5.3),
        "5.3 minutes alone, which would bring the whole to about 14.5 minutes: too close to "
        "the 15-minute budget on a machine doing anything else; its initial syncs and edits "
        "against rsync are measured again, side by side, by `bench/compare.py`",
    ),
    (
        Step("node_bench.py", (), "Node", 7.0),
        "about 7 minutes alone (a 90 s idle window, clusters of up to 20 nodes)",
    ),
    (
        Step("discovery_bench.py", ("--write-doc",), "Discovery", 7.0),
        "about 7 minutes alone, and it needs network namespaces (root, `ip netns`)",
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="say what would run, run nothing")
    parser.add_argument("--workdir", default="/tmp/backer-bench", help="datasets and scratch")
    parser.add_argument(
        "--everything",
        action="store_true",
        help="also run the longer benchmarks (every section of the doc; about 23 minutes)",
    )
    args = parser.parse_args(argv)
    if args.list:
        print(_listing())
        return 0
    _ensure_backer()
    sys.path.insert(0, str(BENCH))
    from common import machine, utc_date, write_doc_section  # noqa: PLC0415 - after the bootstrap

    date = utc_date()
    started = time.perf_counter()
    ran: list[tuple[Step, float, int]] = []
    steps = STEPS + tuple(step for step, _ in LEFT_OUT) if args.everything else STEPS
    for step in steps:
        print(f"== {step.command()}", flush=True)
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(BENCH / step.script), *step.args, "--workdir", args.workdir],
            cwd=REPO,
            check=False,
        )
        minutes = (time.perf_counter() - began) / 60
        ran.append((step, minutes, done.returncode))
        print(f"== {step.script} exited {done.returncode} after {minutes:.1f} minutes", flush=True)
    total = (time.perf_counter() - started) / 60
    failed = [step.script for step, _, code in ran if code != 0]
    invoked = "python3 bench/all.py" + (" --everything" if args.everything else "")
    lines = [
        f"Last run {date} on {machine()}: `{invoked}`, {total:.1f} minutes in all"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + ".",
        "",
        "| command | section | minutes | exit |",
        "|---|---|---|---|",
        *(
            f"| `{step.command()}` | {step.section} | {minutes:.1f} | {code} |"
            for step, minutes, code in ran
        ),
        "",
        "Left out of the default run, to keep it under 15 minutes (`python3 bench/all.py "
        "--everything` runs them too, about 23 minutes in all; or run each on its own: each "
        "rewrites only its section):",
        "",
        *(
            f"- `{step.command()}` ({step.section}): {why}."
            for step, why in LEFT_OUT
            if step not in steps
        ),
    ]
    write_doc_section(DOC, SECTION, "\n".join(lines) + "\n")
    print(f"all done in {total:.1f} minutes (budget {BUDGET_MINUTES})")
    return 1 if failed else 0


def _listing() -> str:
    lines = ["runs, in order:"]
    lines += [f"  {s.command()}   (~{s.minutes:g} min, section {s.section})" for s in STEPS]
    lines.append(f"  ~{sum(s.minutes for s in STEPS):g} minutes in all")
    lines.append("left out (run with --everything):")
    lines += [f"  {step.command()}   ({step.section}): {why}" for step, why in LEFT_OUT]
    return "\n".join(lines)


def _ensure_backer() -> None:
    """Make sure this interpreter can import backer; otherwise set up `.venv` and re-run
    this script with it (once: the re-run is marked in the environment)."""
    try:
        import backer  # noqa: F401, PLC0415 - the check itself
    except ImportError:
        pass
    else:
        return
    if os.environ.get("BACKER_BENCH_BOOTSTRAPPED"):
        raise SystemExit("backer is still not importable after installing it into .venv")
    env_dir = REPO / ".venv"
    python = env_dir / "bin" / "python"
    if not python.exists():
        print(f"creating {env_dir} ...", flush=True)
        venv.create(env_dir, with_pip=True)
    print("installing backer into it (pip install -e .) ...", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO)], check=True)
    env = {**os.environ, "BACKER_BENCH_BOOTSTRAPPED": "1"}
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


if __name__ == "__main__":
    raise SystemExit(main())
