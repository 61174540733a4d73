"""The Syncthing harness (`bench/syncthing.py`) runs: it installs Syncthing if missing (Debian's
package; it fails, never skips, if that is impossible), starts two instances on 127.0.0.1,
checks that they use nothing but loopback, measures two single-hop latencies, and tears
everything down. It asserts sane figures, not fast ones. Runtime about 6 s: 1 s of start-up, then
per sample 1.25 s for the watcher to go quiet plus the 1 s latency itself."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks import each other as top-level modules

import syncthing  # noqa: E402


def test_syncthing_pair_measures_latency() -> None:
    syncthing.ensure_syncthing()
    with syncthing.SyncthingPair() as pair:
        base = pair.base
        pids = [pid for instance in pair.instances for pid in instance.pids()]
        assert len(pids) >= 2, pids
        latencies = pair.measure_latency(2)
    assert len(latencies) == 2, latencies
    for latency in latencies:
        assert isinstance(latency, float)
        assert 0 < latency < 30, latencies
    assert base is not None
    assert not base.exists(), "the temporary directory outlived the harness"
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "a process survived"
