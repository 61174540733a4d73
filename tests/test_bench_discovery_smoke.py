"""The discovery benchmark still runs: `bench/discovery_bench.py --quick` end to end in this
process (real network namespaces, so root, as the other namespace tests; it fails, never skips,
where they cannot be made): one sample of two `backer run` nodes finding each other by mDNS on a
bridged LAN, and one by the DHT across routed subnets through a `backer dht` bootstrap node; no
Syncthing. It asserts sane figures, not fast ones, and that a quick run writes no docs. Runtime
about 10 s (each sample: two homes made, host 1 started and left 2 s, host 2 timed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks import each other as top-level modules

import discovery_bench  # noqa: E402


def test_discovery_bench_quick_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_text() if doc.exists() else None
    assert discovery_bench.main(["--quick", "--workdir", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    results = json.loads(out.strip().splitlines()[-1])

    assert "mDNS: launch of host 2 -> its first peer connected" in out, out
    assert "DHT, routed subnets: launch of host 2 -> its first peer connected" in out, out
    assert results["syncthing"] == "", "the quick run starts no Syncthing"
    samples = results["samples"]
    assert set(samples) == {"mdns", "dht"}, samples
    for method, runs in samples.items():
        assert len(runs) == discovery_bench.QUICK.samples == 1, runs
        for run in runs:
            # From the launch: the interpreter starts, imports, listens, starts its finders
            # (node_started), then a peer connects; all within the benchmark's limits.
            assert 0 < run["started"] < discovery_bench.START_LIMIT, run
            assert 0 < run["connected"] < discovery_bench.CONNECT_LIMIT, run
            assert run["both"] is None and run["event"] is None, run
            if run["found"] is not None:
                assert 0 < run["found"] < discovery_bench.CONNECT_LIMIT, run
                assert run["via"] == method, run  # only the method asked for ran
            assert not run["notes"], run  # no errors reported, clean exits
    # Nothing of a sample outlives it.
    assert not list((tmp_path / "discovery").iterdir())

    assert (doc.read_text() if doc.exists() else None) == before, "--quick must not write docs"
