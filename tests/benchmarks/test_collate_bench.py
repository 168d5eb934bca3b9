"""benchmarks/collate_bench.py: one image pass vs two, identical batches, on a mini SynthMed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from synthmed_fixtures import mini_synthmed_env

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_bench_times_both_collators_on_identical_batches(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("collate_bench", BENCHMARKS / "collate_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with mini_synthmed_env(tmp_path / "cache"):
        monkeypatch.setattr(sys, "argv", ["collate_bench.py", "--batches", "3", "--batch-size", "4"])
        bench.main()
    out = capsys.readouterr().out
    times = dict(re.findall(r"^(one pass|two passes)\s*:\s+([\d.]+) ms per batch of 4 \(median of 3\)$", out, re.M))
    assert set(times) == {"one pass", "two passes"} and all(float(t) > 0 for t in times.values()), out
    ratio = float(re.search(r"one pass / two passes: ([\d.]+); identical batches: yes", out).group(1))
    one, two = float(times["one pass"]), float(times["two passes"])
    assert abs(ratio - one / two) < 0.05, out   # (the printed times are rounded to 0.1 ms)
