"""`benchmarks/frontier.py` and its renderer: budgets are matched, rankings are
stated only where a paired comparison over seeds separates methods, and every
check of the report fails on failing input."""

import json
import pathlib

import numpy as np
import pytest
from helpers import BENCHMARKS, load_benchmark, run_record


render = load_benchmark("_render")
frontier = load_benchmark("frontier")


def _row(method="lsd", seed=0, budget=1.0, value=0.5, **changes) -> dict:
    row = {
        "dataset": "ring",
        "method": method,
        "seed": seed,
        "budget": budget,
        "teacher_kind": "learned",
        "steps": 1000,
        "teacher_steps": 0,
        "fpe": 3.0,
        "step_flops": 3.0,
        "own_flops": 3000.0 * budget,
        "teacher_flops": 0.0,
        "total_flops": 3000.0 * budget,
        "train_s": 1.0,
        "metrics": {"nfe1": {"rmse": value, "energy": 0.01}},
        "floors": {"energy_fresh": 0.001},
        "settings": {
            "width": 8,
            "depth": 1,
            "batch_size": 16,
            "base_steps": 1000,
            "n_eval": 10,
        },
        "seconds": 2.0,
        "command": "python benchmarks/frontier.py --quick",
        "machine": {"git": {"commit": "abc1234"}, "platform": "test", "cpu_count": 2},
    }
    if method == "flow-matching":
        row["metrics"]["nfe128"] = {"rmse": value / 4, "energy": 0.005}
    return {**row, **changes}


def _seeds(*values: float) -> dict[int, float]:
    return dict(enumerate(values))


def test_ranking_is_stated_only_where_a_paired_comparison_separates():
    # Seed-by-seed, b is worse than a on every seed; c's range overlaps b's but c
    # is worse than b on every seed it shares: pairing separates what ranges
    # cannot.
    groups = render.separated_ranking(
        {
            "a": _seeds(1.0, 1.1, 1.2),
            "b": _seeds(2.0, 2.1, 3.0),
            "c": _seeds(2.05, 2.2, 3.1),
        }
    )
    assert groups == [["a"], ["b"], ["c"]]
    # Failing input: seeds that disagree in sign never separate.
    assert render.separated_ranking(
        {"x": _seeds(1.0, 2.0, 1.0), "y": _seeds(1.5, 1.5, 1.5)}
    ) == [["x", "y"]]
    # A shift that is the same on every seed separates, however wide the ranges.
    assert render.separated_ranking(
        {"x": _seeds(1.0, 5.0, 9.0), "y": _seeds(1.1, 5.1, 9.1)}
    ) == [["x"], ["y"]]


def test_behind_needs_enough_shared_seeds_and_an_interval_above_zero():
    assert render.behind(_seeds(1.0, 1.0, 1.0), _seeds(2.0, 2.0, 2.0))
    assert not render.behind(_seeds(2.0, 2.0, 2.0), _seeds(1.0, 1.0, 1.0))
    # One seed is not a comparison; seeds not shared are not compared.
    assert not render.behind({0: 1.0}, {0: 2.0})
    assert not render.behind({0: 1.0, 1: 1.0}, {2: 2.0, 3: 2.0})
    # Four small wins and one large loss: the interval straddles zero.
    a, b = _seeds(1, 1, 1, 1, 5), _seeds(1.1, 1.1, 1.1, 1.1, 1.0)
    assert not render.behind(a, b) and not render.behind(b, a)


def test_a_single_seed_is_not_ranked(tmp_path):
    """One seed cannot be paired: the report ranks only methods with several,
    flow matching at the same number of evaluations among them."""
    rows = [_row(m, s, value=v) for m, v in (("flow-matching", 2.0), ("lsd", 0.5))
            for s in range(2)] + [_row("pfmm", 0, value=0.1)]  # fmt: skip
    render.write_report(rows, tmp_path)
    text = (tmp_path / "frontier.md").read_text()
    assert (
        "1 step, ordered where a paired comparison over seeds separates them: "
        "lsd < flow-matching" in text
    )
    assert "pfmm" in text and "< pfmm" not in text and "pfmm <" not in text
    # The summary names the best method with several seeds, not the lone one,
    # and its ratio to flow matching's best solver at its most evaluations.
    assert (
        "| ring | rmse | 1 | lsd (0.5; 1.00×) | – | – | euler, 128 NFE: 0.5 "
        "[0.5–0.5] |" in text
    )


def test_unbeaten_methods_are_those_no_method_ranks_ahead_of():
    # a beats c on every seed; b ties both (its seeds disagree in sign with each).
    values = {
        "a": _seeds(1.0, 2.0, 1.5),
        "b": _seeds(2.5, 1.0, 1.6),
        "c": _seeds(2.5, 3.0, 2.0),
    }
    assert render.unbeaten(values) == ["a", "b"]
    assert render.separated_ranking(values)[0][:2] == ["a", "b"]


def test_flow_matching_is_compared_at_its_best_solver(tmp_path):
    """Each solver is its own line in the tables, and the summary's reference is
    the solver with the lowest median at the most evaluations."""
    rows = []
    for seed in range(2):
        fm = _row("flow-matching", seed, value=2.0)
        fm["metrics"]["heun-nfe128"] = {"rmse": 0.3, "energy": 0.001}
        fm["metrics"]["dpm2m-nfe128"] = {"rmse": 0.4, "energy": 0.001}
        rows += [fm, _row("lsd", seed, value=0.6)]
    render.write_report(rows, tmp_path)
    text = (tmp_path / "frontier.md").read_text()
    assert "| flow-matching (heun) |" in text and "| flow-matching (dpm2m) |" in text
    assert "lsd (0.6; 2.00×) | – | – | heun, 128 NFE: 0.3 [0.3–0.3] |" in text


def test_budgets_charge_the_teacher_its_share():
    settings = frontier.Settings(8, 1, 1000, 16, 10)
    own, teacher = frontier.plan_steps(2.0, 3.0, 6.0, settings, uses_teacher=True)
    assert teacher == 1000  # half of 2× flow matching's 1000 steps
    assert own * 6.0 + teacher * 3.0 == pytest.approx(2.0 * 1000 * 3.0)
    own, teacher = frontier.plan_steps(2.0, 3.0, 6.0, settings, True, share=0.25)
    assert teacher == 500
    assert own * 6.0 + teacher * 3.0 == pytest.approx(2.0 * 1000 * 3.0)
    own, teacher = frontier.plan_steps(1.0, 3.0, 12.0, settings, uses_teacher=False)
    assert (own, teacher) == (250, 0)  # four times the cost: a quarter of the steps


def test_every_method_gets_the_same_trials_and_a_teacher_share_meets_each_setting():
    plain, distilled = frontier.trials(False), frontier.trials(True)
    grid = len(frontier.LEARNING_RATES) * len(frontier.HORIZONS)
    assert len(plain) == len(distilled) == grid == 15
    assert {(t.lr, t.horizon) for t in plain} == {(t.lr, t.horizon) for t in distilled}
    assert {t.share for t in plain} == {0.5}
    for field, values in (
        ("lr", frontier.LEARNING_RATES),
        ("horizon", frontier.HORIZONS),
    ):
        for value in values:
            shares = {t.share for t in distilled if getattr(t, field) == value}
            assert shares == set(frontier.SHARES), (field, value)


def test_tuning_chooses_the_trial_with_the_lowest_mean_of_one_and_two_jumps():
    def tuned(method, lr, one, two):
        row = _row(method, 100, value=one, trial={"lr": lr, "horizon": 1.0,
                                                   "share": 0.5})  # fmt: skip
        row["metrics"]["nfe2"] = {"rmse": two, "energy": 0.01}
        return row

    nan = float("nan")
    rows = [tuned("lsd", 0.5, 0.5, 0.5), tuned("lsd", 2.0, 0.3, 0.9),
            tuned("lsd", 1.0, 0.4, 0.4), tuned("lsd", 4.0, nan, 0.1)]  # fmt: skip
    rows.append({**tuned("lsd", 8.0, 0.0, 0.0), "error": "diverged"})
    assert frontier.choose(rows)["lsd"]["lr"] == 1.0


def test_commands_and_paths_are_relative_to_the_repository(tmp_path):
    out = frontier.ROOT / "benchmarks" / "results" / "frontier"
    line = frontier.command_line("benchmarks/frontier.py", ["--out", str(out)])
    assert line == "python benchmarks/frontier.py --out benchmarks/results/frontier"
    assert str(frontier.ROOT) not in line
    # Outside the repository a path stays as given.
    line = frontier.command_line("benchmarks/frontier.py", ["--out", str(tmp_path)])
    assert str(tmp_path) in line


def _plan():
    return {"ring": (1.0,)}


def test_checks_pass_on_complete_rows():
    rows = [_row(m, s) for m in ("flow-matching", "lsd") for s in range(3)]
    results = render.checks(rows, ("flow-matching", "lsd"), _plan())
    assert all(ok for _, ok, _ in results), results


@pytest.mark.parametrize(
    "broken, check",
    [
        ("error", "runs"),
        ("off budget", "compute matched"),
        ("missing seed", "coverage"),
    ],
)
def test_each_check_fails_on_failing_input(broken, check):
    rows = [_row(m, s) for m in ("flow-matching", "lsd") for s in range(3)]
    if broken == "error":
        rows[-1] = {**_row("lsd", 2), "error": "FloatingPointError: diverged"}
        rows[-1].pop("metrics")
    elif broken == "off budget":
        rows[-1] = _row("lsd", 2, total_flops=4500.0)
    else:
        rows.pop()
    results = {name: (ok, text) for name, ok, text in render.checks(
        rows, ("flow-matching", "lsd"), _plan()
    )}  # fmt: skip
    ok, text = results[check]
    assert not ok, text
    # A failed run also leaves its cell a seed short; nothing else fails.
    also = {"coverage"} if broken == "error" else set()
    assert all(ok for name, (ok, _) in results.items() if name not in {check, *also})


def test_a_method_outside_the_headline_that_beats_it_fails_the_check():
    rows = [_row(m, s, value=v) for m, v in (("flow-matching", 2.0), ("lsd", 0.5))
            for s in range(3)]  # fmt: skip
    tied = rows + [_row("esd", s, value=0.5) for s in range(3)]
    headline = ("flow-matching", "lsd")
    results = {n: ok for n, ok, _ in render.checks(tied, headline, _plan())}
    assert results["headline subset"]
    better = rows + [_row("esd", s, value=0.1) for s in range(3)]
    results = {n: (ok, t) for n, ok, t in render.checks(better, headline, _plan())}
    ok, text = results["headline subset"]
    assert not ok and "esd (ring, budget 1, 1 step)" in text


def test_a_run_with_a_superseded_or_missing_trial_fails_the_tuned_check():
    """Once a wider tuning chooses another trial, the runs made with the old one
    are named, as are tuned runs of a method `tuned.json` does not hold; the
    untuned control is exempt."""
    old, new = {"lr": 2.0, "horizon": 1.0, "share": 0.5}, {"lr": 4.0, "horizon": 1.0,
                                                            "share": 0.5}  # fmt: skip
    rows = [_row(m, s, protocol=2, trial=old) for m in ("flow-matching", "lsd")
            for s in range(3)]  # fmt: skip
    rows += [_row(render.CONTROL, s, protocol=2, trial={}) for s in range(3)]
    headline = ("flow-matching", "lsd")
    current = {"flow-matching": old, "lsd": old}
    results = {n: ok for n, ok, _ in render.checks(rows, headline, _plan(), current)}
    assert results["tuned settings"]
    for tuned, needle in (
        ({"flow-matching": old, "lsd": new}, "lsd on ring b1 (lr×2 horizon×1 share "
                                             "0.5; chosen lr×4"),
        ({"flow-matching": old}, "lsd on ring b1 (lr×2 horizon×1 share 0.5; chosen "
                                 "not tuned)"),
    ):  # fmt: skip
        results = {n: (ok, t) for n, ok, t in render.checks(rows, headline, _plan(),
                                                              tuned)}  # fmt: skip
        ok, text = results["tuned settings"]
        assert not ok and needle in text and "1 cells" in text, text


def test_runs_of_a_superseded_trial_are_kept_but_left_out_of_the_report(tmp_path):
    old, new = {"lr": 2.0, "horizon": 1.0, "share": 0.5}, {"lr": 4.0, "horizon": 1.0,
                                                            "share": 0.5}  # fmt: skip
    rows = [_row("flow-matching", s, value=1.0, protocol=2, trial=new)
            for s in range(3)]  # fmt: skip
    rows += [_row("lsd", s, value=9.0, protocol=2, trial=old) for s in range(3)]
    tuned = {"flow-matching": new, "lsd": new}
    assert render.current(rows, tuned) == rows[:3]
    assert render.current(rows, None) == rows
    plan = {"ring": (1.0,)}
    render.write_report(rows, tmp_path, plan=plan, headline=("lsd",), tuned=tuned)
    text = (tmp_path / "frontier.md").read_text()
    assert "3 runs trained with a trial that tuning no longer chooses" in text
    assert "9 [9–9]" not in text  # the superseded median is nowhere
    assert "- FAIL: coverage" in text and "ring lsd b1 (0)" in text
    # Rerun with the chosen trial: its rows are the ones read.
    rows += [_row("lsd", s, value=2.0, protocol=2, trial=new) for s in range(3)]
    render.write_report(rows, tmp_path, plan=plan, headline=("lsd",), tuned=tuned)
    text = (tmp_path / "frontier.md").read_text()
    assert "2 [2–2]" in text and "- ok: coverage" in text
    assert "- ok: tuned settings" in text


def test_report_marks_medians_below_the_real_floor(tmp_path):
    floors = {
        "fd_real": 2.0,
        "split": [600, 400],
        "classifier_accuracy": 0.9,
        "fd_real_rows": 600,
    }
    rows = [
        _row(
            m,
            s,
            value=v,
            dataset="digits",
            floors=floors,
            metrics={"nfe1": {"fd": v, "accuracy": 0.9}},
        )  # fmt: skip
        for m, v in (("flow-matching", 1.5), ("lsd", 3.0))
        for s in range(3)
    ]
    render.write_report(rows, tmp_path, plan={"digits": (1.0,)}, headline=("lsd",))
    text = (tmp_path / "frontier.md").read_text()
    assert "1.5† [1.5–1.5]" in text and "3 [3–3]" in text
    settings = "MLP of width 8 and depth 1 on batches of 16 rows; budget 1 is 1000"
    assert settings in text
    assert "Below the real-versus-real floor" in text
    assert "flow-matching at budget 1 with 1 step (1.5)" in text
    assert "lsd at budget 1" not in text
    # Above the floor everywhere: said so, not left out.
    higher = {**floors, "fd_real": 1.0}
    assert "No median is below" in render.below_floor(
        [{**r, "floors": higher} for r in rows], 1.0
    )
    assert "Real-versus-real floor" in text and "**2**" in text
    assert (tmp_path / "frontier-digits.png").exists()
    assert "- ok: coverage" in text
    assert "`python benchmarks/frontier.py --quick` at `abc1234`" in text


@pytest.mark.slow
def test_a_tiny_run_writes_rows_and_resumes(tmp_path, monkeypatch):
    tiny = frontier.Settings(16, 1, 20, 32, 64)
    monkeypatch.setitem(frontier.QUICK, "ring", tiny)
    argv = ["--quick", "--datasets", "ring", "--seeds", "0", "--methods", "lsd",
            "pfmm", "--budgets", "1", "--out", str(tmp_path),
            "--allow-dirty"]  # fmt: skip
    assert frontier.main(argv) == 0
    rows = frontier.read_rows(tmp_path / "rows.jsonl")
    assert [r["method"] for r in rows] == ["flow-matching", "lsd", "pfmm"]
    pfmm = rows[2]
    assert pfmm["teacher_steps"] == 10 and "charged" in pfmm["teacher"]
    for row in rows:
        base = 20 * rows[0]["step_flops"]
        # Whole steps: a method's budget rounds by at most half of one of its steps.
        assert abs(row["total_flops"] - base) <= row["step_flops"] / 2
        assert "rmse" in row["metrics"]["nfe1"]
    with pytest.raises(SystemExit, match="--resume"):
        frontier.main(argv)
    assert frontier.main([*argv, "--resume"]) == 0  # nothing left to run
    assert len(frontier.read_rows(tmp_path / "rows.jsonl")) == 3
    assert (tmp_path / "frontier.md").exists()
    saved = tmp_path / "samples" / "ring"
    assert (saved / "lsd-b1-s0-learned-nfe1.npy").exists()
    # Enough to recompute the paired errors: noise, exact end points, mixture.
    noise, exact = np.load(saved / "noise.npy"), np.load(saved / "exact.npy")
    assert noise.shape == exact.shape == (64, 2)
    assert set(json.loads((saved / "mixture.json").read_text())) >= {"weights", "means"}
    sample = np.load(saved / "lsd-b1-s0-learned-nfe1.npy")
    recomputed = np.sqrt(np.mean(np.sum((sample - exact) ** 2, axis=1)))
    assert recomputed == pytest.approx(rows[1]["metrics"]["nfe1"]["rmse"], rel=1e-5)


def test_renoised_samples_are_shown_but_not_ranked_by_paired_error(tmp_path):
    """After a re-noising jump a to-data map's sample does not pair with its first
    noise's end point: its 2-step paired error is marked and left out of the
    ranking, its 1-step error is ranked."""
    two = {"nfe1": {"rmse": 0.9}, "nfe2": {"rmse": 0.1}}
    rows = [_row("ect", s, kind="to-data", metrics=two) for s in range(2)]
    rows += [_row("lsd", s, kind="two-time", value=0.5) for s in range(2)]
    for r in rows[2:]:
        r["metrics"] = {"nfe1": {"rmse": 0.5}, "nfe2": {"rmse": 0.4}}
    render.write_report(rows, tmp_path)
    text = (tmp_path / "frontier.md").read_text()
    assert "0.1 [0.1–0.1]‡" in text
    assert (
        "2 steps, ordered where a paired comparison over seeds separates them"
        not in text
    )
    assert (
        "1 step, ordered where a paired comparison over seeds separates them: lsd < ect"
        in text
    )
    assert "| ring | rmse | 1 | lsd (0.5) | lsd (0.4) |" in text
    assert render.unpaired(rows[0], "nfe2", "rmse")
    assert not render.unpaired(rows[0], "nfe2", "energy")


def test_exact_teacher_tables_follow_and_are_labelled(tmp_path):
    rows = [
        _row("pid", s, teacher_kind=t) for t in ("exact", "learned") for s in (0, 1)
    ]
    render.write_report(rows, tmp_path)
    text = (tmp_path / "frontier.md").read_text()
    learned = text.index("### Budget 1× flow matching's\n")
    exact = text.index("### Budget 1× flow matching's — exact teacher (ablation)")
    assert learned < exact
    summary = text.index("| ring | rmse | 1 | pid")
    assert summary < text.index("| ring | rmse | 1, exact teacher | pid") < learned


def test_resume_refuses_rows_of_other_settings(tmp_path, monkeypatch):
    """Rows of one data set must share their settings: a resumed run with another
    `--size` (or changed settings) stops before it trains anything."""
    monkeypatch.setitem(frontier.QUICK, "ring", frontier.Settings(16, 1, 20, 32, 64))
    other = _row("flow-matching", settings={"width": 99})
    frontier.append(tmp_path / "rows.jsonl", other)
    argv = ["--quick", "--datasets", "ring", "--out", str(tmp_path), "--resume",
            "--allow-dirty"]  # fmt: skip
    with pytest.raises(SystemExit, match="other settings"):
        frontier.main(argv)
    assert frontier.read_rows(tmp_path / "rows.jsonl") == [other]


def test_a_run_from_a_dirty_tree_is_refused_unless_allowed(tmp_path, monkeypatch):
    import _machine

    real = _machine.machine

    def machine(dirty):
        return lambda: real() | {"git": {"commit": "abc1234", "dirty": dirty}}

    # Every benchmark that writes rows asks `_machine.clean_machine`.
    monkeypatch.setattr(_machine, "machine", machine(True))
    argv = ["--quick", "--datasets", "ring", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="uncommitted changes"):
        frontier.main(argv)
    assert not (tmp_path / "rows.jsonl").exists()
    assert _machine.clean_machine(allow_dirty=True)["git"]["dirty"] is True
    # The report marks rows that were allowed to run from a dirty tree.
    rows = [_row("lsd", s, machine={"git": {"commit": "abc1234", "dirty": True},
                                    "platform": "test", "cpu_count": 2})
            for s in range(2)]  # fmt: skip
    render.write_report(rows, tmp_path)
    assert (
        "at `abc1234` (uncommitted changes)" in (tmp_path / "frontier.md").read_text()
    )


def test_meanflow_ablation_rows():
    import meanflow_ablation as ablation

    import fmcalc

    rows = {m.name: m for m in ablation.variants()}
    assert len(rows) == len(ablation.VARIANTS)
    plain = rows["meanflow-cond-sg-mf"]
    assert plain.learning == "marginal-from-conditional"
    # The first variant is MeanFlow itself, with plain squared error.
    meanflow = fmcalc.methods.get("meanflow", loss=fmcalc.SquaredError())
    assert str(plain.terms[0].residual) == str(meanflow.terms[0].residual)
    assert plain.terms[0].times == meanflow.terms[0].times
    assert rows["meanflow-exact-full-tri"].learning == "distillation"
    # The true gradient with the conditional velocity is biased, so not in the grid:
    # the validator refuses it.
    with pytest.raises(ValueError, match="onditional"):
        fmcalc.eulerian(
            form="V", stop_gradient="none", velocity=fmcalc.ConditionalVelocity()
        )


def _orderings(path: pathlib.Path) -> dict[int, list[set[str]]]:
    """The groups of each "ordered where a paired comparison ..." line."""
    out = {}
    for line in path.read_text().splitlines():
        head, sep, tail = line.partition(
            ", ordered where a paired comparison over seeds separates them: "
        )
        if sep:
            groups = [g.strip("{} ") for g in tail.split(" < ")]
            out[int(head.split()[0])] = [set(g.split(", ")) for g in groups]
    return out


def test_the_meanflow_paragraph_holds_in_the_committed_report():
    """docs/benchmarks/quality.md reads the ablation's orderings in words; the
    committed report must still say what the words say."""
    report = BENCHMARKS / "results" / "meanflow-ablation" / "frontier.md"
    orderings = _orderings(report)
    assert sorted(orderings) == [1, 2, 4]

    def group(steps, name):
        return next(i for i, g in enumerate(orderings[steps]) if name in g)

    for steps in (1, 4):
        assert group(steps, "meanflow-cond-sg-mf") == group(
            steps, "meanflow-exact-sg-mf"
        )
    assert group(2, "meanflow-cond-sg-mf") < group(2, "meanflow-exact-sg-mf")
    for steps in (1, 2, 4):
        assert group(steps, "meanflow-exact-full-tri") == 0
    for steps in (2, 4):
        full = group(steps, "meanflow-exact-full-mf")
        assert full < group(steps, "meanflow-cond-sg-mf")
        assert full < group(steps, "meanflow-exact-sg-mf")


def test_the_tuning_report_names_the_chosen_trial_and_its_cost(tmp_path):
    def trial(lr, value, **changes):
        return _row(
            "lsd", 100, value=value, trial={"lr": lr, "horizon": 1.0, "share": 0.5},
            **changes,
        )  # fmt: skip

    rows = [trial(0.5, 0.4), trial(1.0, 0.3), trial(2.0, 0.9)]
    rows.append({**trial(4.0, 0.0), "error": "NonFiniteError: diverged"})
    broken = {**_row("pfmm", 100), "error": "NonFiniteError: diverged"}
    rows.append(broken)
    chosen = frontier.choose(rows)
    assert chosen == {"lsd": {"lr": 1.0, "horizon": 1.0, "share": 0.5}}
    render.write_tuning(rows, chosen, tmp_path)
    text = (tmp_path / "tuning.md").read_text()
    assert "| lsd | 4 (1 failed) | **1** | **1** | **0.5** | 0.3 | 0.9 |" in text
    assert "| pfmm | 1 | – | – | – | – | – |" in text
    assert "Tuning cost: 5 runs" in text
    assert "Chosen at the edge of the grid" in text and "none." in text
    # At the largest rate tried: named.
    rows.append(trial(8.0, 0.1))
    chosen = frontier.choose(rows)
    render.write_tuning(rows, chosen, tmp_path)
    assert "lsd (lr ×8)." in (tmp_path / "tuning.md").read_text()


def test_the_answer_states_each_headline_figure_against_its_target(tmp_path):
    rows = []
    for dataset in ("ring", "mnist"):
        for seed in range(3):
            fm = _row("flow-matching", seed, value=4.0, dataset=dataset)
            fm["metrics"]["nfe128"] = {"rmse": 0.2, "energy": 0.01}
            good = _row("lsd", seed, value=0.4 + 0.01 * seed, dataset=dataset)
            good["metrics"]["nfe2"] = {"rmse": 0.3, "energy": 0.01}
            rows += [fm, good, _row("psd", seed, value=0.9, dataset=dataset)]
    lines = render.answer(rows)
    text = "\n".join(lines)
    # ring: 0.41 / 0.2 = 2.05x, within 2.5x; mnist's 1 jump is not within 1.2x.
    assert "| best 1-jump ratio, ring (lsd) | 2.05× | ≤ 2.5× | yes | 3 |" in text
    assert "| best 1-jump ratio, mnist (lsd) | 2.05× | ≤ 1.2× | no | 3 |" in text
    assert "| best 2-jump ratio, mnist (lsd) | 1.50× | ≤ 1.05× | no | 3 |" in text
    assert "| ring | rmse | 3 | lsd (0.41; 2.05×) |" in text


def test_the_headline_subset_is_chosen_on_the_selection_sets_only():
    rows = []
    for seed in range(3):
        for dataset, winner in (("aniso2d", "pid"), ("digits", "ect"),
                                ("ring", "facm")):  # fmt: skip
            rows.append(_row(winner, seed, value=0.1, dataset=dataset))
            rows.append(_row("lsd", seed, value=0.5 + seed, dataset=dataset))
    assert render.select_headline(rows) == ["pid", "ect"]


def test_the_committed_headline_is_the_selection_of_the_committed_rows():
    out = BENCHMARKS / "results" / "frontier-rerun"
    tuned = json.loads((out / "tuned.json").read_text())
    every = frontier.read_rows(out / "rows.jsonl")
    rows = render.current(every, tuned)
    gaps = render.selection_gaps(every, rows)
    if gaps:  # a retuning superseded selection runs: the report must say so
        assert "The selection is incomplete" in (out / "frontier.md").read_text()
    else:
        assert list(frontier.HEADLINE) == render.select_headline(rows)


def test_a_selection_superseded_by_a_retuning_is_called_incomplete():
    old, new = {"lr": 4.0, "horizon": 1.0, "share": 0.5}, {"lr": 8.0, "horizon": 1.0,
                                                            "share": 0.5}  # fmt: skip
    rows = [_row(m, s, value=v, dataset="aniso2d", protocol=2, trial=old)
            for m, v in (("pid", 0.1), ("lsd", 0.5)) for s in range(2)]  # fmt: skip
    assert render.selection_gaps(rows, rows) == []
    tuned = {"pid": new, "lsd": old}
    shown = render.current(rows, tuned)
    assert render.selection_gaps(rows, shown) == ["pid on aniso2d"]


def test_a_tree_is_dirty_unless_only_run_outputs_are_new():
    import _machine

    assert not _machine.dirty("")
    assert not _machine.dirty("?? benchmarks/results/frontier-rerun/\n")
    assert _machine.dirty(" M fmcalc/_method.py\n")
    assert _machine.dirty("?? benchmarks/results/x.jsonl\n?? fmcalc/new.py\n")
    assert not _machine.dirty(" M benchmarks/results/frontier/rows.jsonl\n")
    assert not _machine.dirty("M benchmarks/results/frontier/rows.jsonl")
    assert _machine.dirty(" M benchmarks/frontier.py\n")


def test_tuning_does_not_judge_a_renoised_jump_by_its_paired_error():
    def trial(lr, one, two):
        row = _row("ect", 100, kind="to-data", trial={"lr": lr, "horizon": 1.0,
                                                        "share": 0.5})  # fmt: skip
        row["metrics"] = {"nfe1": {"rmse": one}, "nfe2": {"rmse": two}}
        return row

    # The second jump re-noises: only the first is paired with the exact end point.
    rows = [trial(1.0, 0.5, 0.1), trial(2.0, 0.4, 3.0)]
    assert frontier.choose(rows)["ect"]["lr"] == 2.0


def test_the_reference_is_the_better_of_tuned_and_untuned_flow_matching():
    rows = []
    for seed in range(3):
        tuned = _row("flow-matching", seed, value=4.0)
        tuned["metrics"]["nfe128"] = {"rmse": 0.4, "energy": 0.01}
        control = _row("flow-matching-untuned", seed, value=4.0)
        control["metrics"] = {"nfe128": {"rmse": 0.2, "energy": 0.01}}
        rows += [tuned, control, _row("lsd", seed, value=0.5)]
    text = "\n".join(render.answer(rows))
    # The map is compared with the untuned control, the better reference here.
    assert "| ring | rmse | 3 | lsd (0.5; 2.50×) |" in text
    assert "euler, untuned, 128 NFE: 0.2 |" in text
    # Neither flow-matching line is a map.
    assert "flow-matching-untuned (" not in text.split("Headline")[0].split("|")[4]


def test_a_baseline_that_is_not_finite_at_its_most_evaluations_is_named():
    """A flow-matching line whose samples blow up at the most evaluations has no
    value there, so it cannot be the reference; the tables say it was left out
    instead of silently comparing with the others."""
    rows = []
    for seed in range(3):
        tuned = _row("flow-matching", seed, value=4.0)
        tuned["metrics"]["nfe128"] = {"nonfinite": 1.0}
        control = _row("flow-matching-untuned", seed, value=4.0)
        control["metrics"] = {"nfe128": {"rmse": 0.2, "energy": 0.01}}
        rows += [tuned, control, _row("lsd", seed, value=0.5)]
    note = "(not finite at 128 NFE: flow-matching on seeds 0, 1, 2)"
    answer = "\n".join(render.answer(rows))
    assert f"euler, untuned, 128 NFE: 0.2 {note} |" in answer
    summary = "\n".join(render.summary(rows))
    assert note in summary
    # Finite everywhere: no note.
    for row in rows:
        if row["method"] == "flow-matching":
            row["metrics"]["nfe128"] = {"rmse": 0.4, "energy": 0.01}
    assert "not finite" not in "\n".join(render.answer(rows) + render.summary(rows))


def test_provenance_says_when_a_run_came_from_uncommitted_changes():
    import _machine

    record = run_record("python benchmarks/apps.py")
    clean = _machine.provenance(record)
    assert "commit `abc1234`;" in clean and "uncommitted" not in clean
    record["machine"]["git"]["dirty"] = True
    assert "with uncommitted changes" in _machine.provenance(record)


def test_a_benchmark_records_the_tree_it_started_from(monkeypatch):
    """A run records the commit and tree state of when it started (the code it
    loaded), not of when it ended, after other commits may have landed."""
    import _machine

    started = dict(_machine.AT_START)
    monkeypatch.setattr(
        _machine, "git", lambda: {"commit": "later", "dirty": not started["dirty"]}
    )
    assert _machine.machine()["git"] == started
