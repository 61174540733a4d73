"""The node benchmark still runs: `bench/node_bench.py --quick` end to end in this process (whole
nodes on 127.0.0.1: single-hop latency, a 5-node line, the idle session with gossip every second
over a 3 s window, convergence of 2 and 3 nodes; no Syncthing), so a change to the node, the
mesh or their events cannot quietly break the benchmark. It asserts sane figures, not fast ones,
and that a quick run writes no docs. Runtime about 8 s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks import each other as top-level modules

import node_bench  # noqa: E402


def test_node_bench_quick_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_text() if doc.exists() else None
    assert node_bench.main(["--quick", "--workdir", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    results = json.loads(out.strip().splitlines()[-1])
    plan = node_bench.QUICK

    for measure in (
        "single-hop latency",
        "5-node line",
        "idle session, TCP payload",
        "idle session, packets",
        "convergence, 2 nodes",
        "convergence, 3 nodes",
    ):
        assert measure in out, out

    hop = results["hop"]
    assert len(hop) == plan.hop_samples
    for sample in hop:
        assert 0 < sample["seconds"] < 10, hop
        # A's scan indexed the file, then B's pull brought it, within the sample.
        assert sample["scanned"] is not None and sample["pulled"][0] is not None, hop
        assert 0 < sample["scanned"] <= sample["pulled"][0] <= sample["seconds"] + 1, hop

    line = results["line"]
    assert len(line) == plan.line_samples
    for sample in line:
        assert 0 < sample["seconds"] < 20, line
        assert len(sample["pulled"]) == plan.line_nodes - 1
        assert all(0 < pulled <= sample["seconds"] + 1 for pulled in sample["pulled"]), line

    idle = results["idle"]
    assert 2.5 < idle["seconds"] < 10, idle
    # Gossip every second each way: a few small records, nothing else.
    assert 0 < idle["sent"] < 2000 and 0 < idle["received"] < 2000, idle
    assert idle["packets"] >= idle["data_packets"] >= 2, idle
    # The nodes' own count of the bytes agrees with the kernel's (a record in flight aside).
    assert abs(idle["link_bytes"] - idle["sent"] - idle["received"]) <= 200, idle
    assert results["idle_syncthing"] is None and results["syncthing"] == []

    assert set(results["convergence"]) == {str(n) for n in plan.sizes}
    for count, runs in results["convergence"].items():
        assert len(runs) == len(plan.trees)
        for run in runs:
            assert run["sessions"] == [int(count) - 1] * int(count), run
            assert 0 < run["seconds"] < 60, run
            # Every other node received the tree (and protocol, framing, encryption): at least
            # its size, not absurdly more.
            for received in run["received"][1:]:
                assert run["tree_bytes"] <= received < 3 * run["tree_bytes"], run
            assert sum(run["sent"]) == sum(run["received"]), run
    assert not results["partitions"]

    assert (doc.read_text() if doc.exists() else None) == before, "--quick must not write docs"
