"""Grid and binary search over the SFT weight on known rho(a) curves; probe table and plot."""

from __future__ import annotations

import csv
import math

from rlhf.calibrate import search


def _curve(fn, calls):
    def evaluate(a):
        calls.append(a)
        return fn(a), {"calls": len(calls)}
    return evaluate


def step_at(c):
    return lambda a: 1.0 if a < c else 0.0


def sigmoid(c, s=30.0):
    return lambda a: 1.0 / (1.0 + math.exp(s * (a - c)))


def test_grid_is_algorithm_1():
    calls = []
    r = search.grid_search(_curve(sigmoid(0.43), calls), k=10, rho_min=0.9)
    assert calls == [j / 10 for j in range(11)]
    assert r.sft_weight == 0.3  # rho(0.3) = 0.98, rho(0.4) = 0.71
    assert r.rho >= 0.9 and len(r.probes) == 11
    assert [p.step for p in r.probes] == list(range(1, 12))


def test_binary_converges_without_early_stop():
    calls = []
    r = search.binary_search(_curve(step_at(0.37), calls), rho_min=0.9, max_steps=8, early_stop=False)
    assert calls[0] == 1.0 and len(calls) == 8
    assert r.sft_weight < 0.37 <= r.sft_weight + 2 ** -7 + 1e-12
    assert r.rho == 1.0


def test_binary_early_stop_in_band():
    calls = []
    r = search.binary_search(_curve(sigmoid(0.55), calls), rho_min=0.9, max_steps=8, early_stop=True)
    # 1.0 -> 0.5 (rho 0.82, infeasible) -> 0.25 (rho 0.9999) -> 0.375 (rho 0.995) -> ...
    assert calls[:3] == [1.0, 0.5, 0.25]
    assert 0.9 <= r.rho < 1.0 and r.stop_reason.startswith("early stop")
    assert len(calls) < 8


def test_binary_endpoints():
    r = search.binary_search(_curve(lambda a: 0.95, []), rho_min=0.9)
    assert r.sft_weight == 1.0 and len(r.probes) == 1
    calls = []
    r = search.binary_search(_curve(lambda a: 0.5, calls), rho_min=0.9, max_steps=3)
    assert r.sft_weight == 0.0 and calls == [1.0, 0.5, 0.25, 0.0] and "alpha*=0" in r.stop_reason


def test_table_and_plot(tmp_path):
    r = search.grid_search(_curve(sigmoid(0.5), []), k=4, rho_min=0.9)
    csv_path, jsonl_path = search.write_table(r, tmp_path)
    rows = list(csv.DictReader(open(csv_path)))
    assert [float(x["sft_weight"]) for x in rows] == [0, 0.25, 0.5, 0.75, 1.0]
    assert {"step", "rho", "seconds", "calls"} <= set(rows[0])
    assert len(jsonl_path.read_text().splitlines()) == 5
    png = search.plot(r, tmp_path / "rho.png")
    assert png.stat().st_size > 1000
