"""`benchmarks/shortcut_levels.py`: the per-level errors it reports are zero for
the exact map and not for a wrong one."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_benchmark


levels = load_benchmark("shortcut_levels")
datasets = load_benchmark("_datasets")


@pytest.mark.slow
def test_the_exact_map_has_no_level_error_and_a_biased_one_does(monkeypatch):
    monkeypatch.setattr(levels, "LEVELS", 3)
    ring = datasets.DATASETS["ring"]()
    noise = np.random.default_rng(0).standard_normal((40, 2)).astype(np.float32)
    exact = levels.ladder(ring.flow, ring.reference(), noise)
    for field in ("error", "defect", "chained"):
        assert len(exact[field]) == 3
        assert max(exact[field]) < 1e-3, (field, exact[field])

    def biased(x, s, t):  # a constant drift on every jump: wrong and inconsistent
        return ring.flow(x, s, t) + jnp.ones_like(x) * 0.5 * (1 + s)

    wrong = levels.ladder(biased, ring.reference(), noise)
    assert min(wrong["error"]) > 0.05 and min(wrong["chained"]) > 0.05
    assert min(wrong["defect"]) > 1e-3


def test_the_report_has_one_line_per_budget(tmp_path):
    record = {"git": {"commit": "abc1234", "dirty": True}}
    rows = [
        {"budget": b, "seed": s, "steps": int(100 * b), "error": [0.1 * b] * 7,
         "defect": [0.01] * 7, "chained": [0.2] * 7, "command": "python x",
         "machine": record}
        for b in (1.0, 2.0) for s in (0, 1)
    ]  # fmt: skip
    levels.render(rows, tmp_path)
    text = (tmp_path / "shortcut-levels.md").read_text()
    assert "| shortcut | 1 | 100 | 0.1 |" in text
    assert "| shortcut | 2 | 200 | 0.2 |" in text
    assert "(uncommitted changes)" in text
