"""Where a leader's step time goes, host side: an opt-in trace for profiling (``FLOTILLA_STEP_TRACE=<file>``).

Each loop turn of a replica leader is split into its phases (take messages and schedule; launch the forward;
launch the sampling; collect, i.e. wait for a step's ids and report them) and tagged with the kind of step
(a decode batch that replays a CUDA graph, a mixed or prefill batch run eagerly) and its size. At the end
the trace writes one JSON summary: per kind of step, how many, and the mean and median of each phase and of
the whole turn. Off unless the variable is set; when on it costs a few ``perf_counter`` calls per step.
"""

from __future__ import annotations

import json
import os
import statistics
import time

PHASES = ("plan", "forward", "sample", "collect")


class StepTrace:
    def __init__(self, path: str | None):
        self.path = path
        self.rows: list[tuple] = []  # (kind, decode rows, prefill tokens, plan, forward, sample, collect, turn)
        self._t = self._turn = 0.0
        self._marks: list[float] = []

    @classmethod
    def from_env(cls) -> "StepTrace | None":
        path = os.environ.get("FLOTILLA_STEP_TRACE")
        return cls(path) if path else None

    def start(self) -> None:
        self._t = self._turn = time.perf_counter()
        self._marks = []

    def mark(self) -> None:
        now = time.perf_counter()
        self._marks.append(now - self._t)
        self._t = now

    def end(self, plans, graphed: bool) -> None:
        if not plans:
            return
        decode = sum(1 for p in plans if len(p.token_ids) == 1)
        prefill = sum(len(p.token_ids) for p in plans if len(p.token_ids) > 1)
        kind = "decode_graph" if graphed else ("decode_eager" if not prefill else
                                              ("mixed" if decode else "prefill"))
        marks = (self._marks + [0.0] * 4)[:4]
        self.rows.append((kind, decode, prefill, *marks, time.perf_counter() - self._turn))

    def summary(self) -> dict:
        out: dict = {}
        for kind in sorted({r[0] for r in self.rows}):
            rows = [r for r in self.rows if r[0] == kind]
            k = {"steps": len(rows), "decode_rows_mean": statistics.fmean(r[1] for r in rows),
                 "prefill_tokens_mean": statistics.fmean(r[2] for r in rows)}
            for i, name in enumerate(PHASES + ("turn",)):
                vals = [r[3 + i] * 1e3 for r in rows]
                k[f"{name}_ms_mean"] = round(statistics.fmean(vals), 3)
                k[f"{name}_ms_p50"] = round(statistics.median(vals), 3)
            k["turn_s_total"] = round(sum(r[7] for r in rows), 3)
            out[kind] = k
        out["total_s"] = round(sum(r[7] for r in self.rows), 3)
        return out

    def write(self) -> None:
        if not self.path or not self.rows:
            return
        with open(self.path, "w") as f:
            json.dump({"summary": self.summary(), "phases": list(PHASES)}, f, indent=1)
