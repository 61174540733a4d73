"""cProfile for every thread of a Python program, for the profiles quoted in docs/benchmarks.md.

`python -m cProfile` sees only the main thread, and backer's scanner does its work in worker
threads (a walker via `asyncio.to_thread`, a hashing pool), so its profile would show nothing
but waiting. This runs a module as `__main__` with one profiler per thread (each `Thread.run` is
wrapped) and writes their merged statistics to one pstats file:

    python bench/threadprof.py -o OUT.prof -m backer --home HOME scan DIR --json

Times of threads that ran in parallel add up, so the total exceeds the wall time. Calls into
Cython and Rust extensions that are not plain builtins (pyfastcdc's generators, constructing a
blake3 hasher) are not seen by cProfile: their time counts in the Python line that called them.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import runpy
import sys
import threading
from collections.abc import Sequence

__all__ = ["main", "profile_module"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # As with `python -m`, everything after the module name belongs to the module.
    split = argv.index("-m") + 2 if "-m" in argv else len(argv)
    parser = argparse.ArgumentParser(
        usage="%(prog)s -o OUTPUT -m MODULE [ARGS ...]",
        description="Profile every thread of `python -m MODULE ARGS` with cProfile.",
    )
    parser.add_argument("-o", "--output", required=True, help="pstats file to write")
    parser.add_argument("-m", "--module", required=True, help="module to run as __main__")
    options = parser.parse_args(argv[:split])
    return profile_module(options.module, argv[split:], options.output)


def profile_module(module: str, args: Sequence[str], output: str) -> int:
    """Run `module` as `python -m module args`, profiling every thread; return its exit code."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.enable()
        try:
            original_run(thread)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign,assignment]
    sys.argv = [module, *args]
    main_profile = cProfile.Profile()
    code = 0
    main_profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        main_profile.disable()
        threading.Thread.run = original_run  # type: ignore[method-assign]
    stats = pstats.Stats(main_profile)
    with lock:
        for profile in profiles:
            stats.add(profile)
    stats.dump_stats(output)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
