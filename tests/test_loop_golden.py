"""The training loop's CPU results are those recorded in tests/golden/loop_cpu.json (tests/loop_golden.py): single
runs, a stop mid-epoch and its resume, and K = 2 groups of seeds (vmap and lockstep), history and final weights,
optimizer and method state by sha256. Recorded with the loop before issue 19 merged parallel.py into engine.train,
so it proves the one loop is bit-for-bit the two it replaced. Compared only on the platform it was recorded on (CPU
kernels of another SIMD width or torch build round differently)."""

import pytest
from loop_golden import cases, matching_record, platform, records


def test_the_loop_reproduces_the_recorded_runs_bit_for_bit(tmp_path):
    golden = matching_record()
    if golden is None:
        pytest.skip(f"no golden recorded on this platform ({platform()}; recorded: "
                    f"{[r['platform'] for r in records()]}); record it with `python tests/loop_golden.py --write` on "
                    f"the commit before the change under test")
    got = cases(tmp_path)
    assert got.keys() == golden["cases"].keys()
    differ = {name: (golden["cases"][name], got[name]) for name in got if got[name] != golden["cases"][name]}
    assert not differ, f"{len(differ)} case(s) changed: " + ", ".join(sorted(differ))
