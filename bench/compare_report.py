"""The comparison suite's results and their report: one table per measure (seconds, peak RSS,
CPU seconds, bytes on the wire), every case a row, every tool a column, then the ratios
backer / each reference; the cases where backer is behind, by how much; and where its time
goes there (py-spy). Imports common, compare_tools (Phase) and compare_profile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from common import grid_markdown, grid_text, median
from compare_profile import SampledProfile
from compare_tools import Phase

__all__ = [
    "BACKER",
    "BEHIND",
    "FLOORS",
    "REFERENCES",
    "TOOLS",
    "Case",
    "Measure",
    "Results",
]

BACKER = "backer"
REFERENCES = ("Syncthing", "rsync")
FLOORS = ("cp -a", "b3sum")
TOOLS = (BACKER, *REFERENCES, *FLOORS)
# backer counts as behind a reference when its figure exceeds the reference's by more than this
# factor: closer than that is within the run-to-run spread.
BEHIND = 1.1


@dataclass(frozen=True, slots=True)
class Case:
    key: str  # "initial small", "append" ...
    title: str  # for the tables
    tree: str
    initial: bool  # an initial sync (floors apply) or a change carried over


@dataclass(frozen=True, slots=True)
class Measure:
    name: str
    value: Callable[[Phase], float]
    show: Callable[[float], str]
    floors: bool  # whether the floors have a figure (cp -a and b3sum send nothing)


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def _bytes(value: float) -> str:
    if value >= 10e6:
        return f"{value / 1e6:,.0f} MB"
    if value >= 1e6:
        return f"{value / 1e6:.1f} MB"
    return f"{value / 1e3:,.1f} kB"


MEASURES = (
    Measure("seconds", lambda p: p.seconds, _seconds, floors=True),
    Measure("peak RSS", lambda p: float(p.peak_rss), _bytes, floors=True),
    Measure("CPU seconds", lambda p: p.cpu, _seconds, floors=True),
    Measure("bytes on the wire", lambda p: float(p.wire), _bytes, floors=False),
)


@dataclass(slots=True)
class Results:
    cases: list[Case] = field(default_factory=list)
    phases: dict[str, dict[str, list[Phase]]] = field(default_factory=dict)  # case, tool -> runs
    verified: list[str] = field(default_factory=list)  # copies found equal to their source
    notes: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    profiles: list[SampledProfile] = field(default_factory=list)

    def add(self, case: Case, tool: str, phase: Phase) -> None:
        if case not in self.cases:
            self.cases.append(case)
        self.phases.setdefault(case.key, {}).setdefault(tool, []).append(phase)

    def figure(self, case: Case, tool: str, measure: Measure) -> float | None:
        runs = self.phases.get(case.key, {}).get(tool)
        if not runs or (tool in FLOORS and not measure.floors):
            return None
        return median([measure.value(phase) for phase in runs])

    def ratio(self, case: Case, reference: str, measure: Measure) -> float | None:
        ours, theirs = self.figure(case, BACKER, measure), self.figure(case, reference, measure)
        if ours is None or theirs is None or theirs <= 0:
            return None
        return ours / theirs

    # -- tables ---------------------------------------------------------------------------------

    def header(self) -> tuple[str, ...]:
        others = [tool for tool in TOOLS if tool != BACKER]
        return ("case", *TOOLS, *(f"{BACKER} / {tool}" for tool in others))

    def rows(self, measure: Measure) -> list[tuple[str, ...]]:
        rows = []
        for case in self.cases:
            cells = [case.title]
            for tool in TOOLS:
                value = self.figure(case, tool, measure)
                cells.append("-" if value is None else measure.show(value))
            for tool in TOOLS[1:]:
                ratio = self.ratio(case, tool, measure)
                cells.append("-" if ratio is None else _ratio(ratio))
            rows.append(tuple(cells))
        return rows

    def text(self) -> str:
        parts = []
        for measure in MEASURES:
            parts += [f"{measure.name}:", grid_text(self.header(), self.rows(measure)), ""]
        parts += self.behind()
        parts += [f"note: {note}" for note in self.notes]
        parts.append(f"verified {len(self.verified)} copies equal to their source")
        return "\n".join(parts)

    def markdown(self) -> str:
        parts = []
        for measure in MEASURES:
            parts += [
                f"**{measure.name}**",
                "",
                grid_markdown(self.header(), self.rows(measure)),
                "",
            ]
        return "\n".join(parts)

    # -- where backer is behind -----------------------------------------------------------------

    def behind(self) -> list[str]:
        """A line per case and measure in which backer does worse than a reference (by more
        than `BEHIND`)."""
        lines = []
        for measure in MEASURES:
            for case in self.cases:
                worse = [
                    (reference, ratio)
                    for reference in REFERENCES
                    if (ratio := self.ratio(case, reference, measure)) is not None
                    and ratio > BEHIND
                ]
                if not worse:
                    continue
                ours = self.figure(case, BACKER, measure)
                assert ours is not None
                than = "; ".join(
                    f"{_ratio(ratio)} {reference}'s "
                    f"{measure.show(self.figure(case, reference, measure) or 0.0)}"
                    for reference, ratio in worse
                )
                lines.append(
                    f"behind on {measure.name}, {case.title}: backer {measure.show(ours)}, {than}"
                )
        return lines

    def slow_cases(self) -> list[Case]:
        """Cases in which backer takes longer than a reference."""
        seconds = MEASURES[0]
        return [
            case
            for case in self.cases
            if any((self.ratio(case, r, seconds) or 0.0) > BEHIND for r in REFERENCES)
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": [asdict(case) for case in self.cases],
            "phases": {
                case: {tool: [asdict(p) for p in runs] for tool, runs in tools.items()}
                for case, tools in self.phases.items()
            },
            "verified": self.verified,
            "notes": self.notes,
            "behind": self.behind(),
            "profiles": [
                {"tag": p.tag, "side": p.side, "samples": p.samples, "lead": p.lead()}
                for p in self.profiles
            ],
        }


def _ratio(ratio: float) -> str:
    if ratio >= 10:
        return f"{ratio:.0f}x"
    return f"{ratio:.2f}x" if ratio >= 0.01 else f"{ratio:.3f}x"
