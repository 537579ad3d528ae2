"""`fmcalc train` and `fmcalc sample`: from data to a trained run, samples and a
picture; resuming; refusals with a message."""

import json

import numpy as np
import pytest

import fmcalc
from fmcalc import _run
from fmcalc._cli import main


def _train(tmp_path, *args):
    return main(["train", *args, "--out", str(tmp_path / "run")])


@pytest.mark.slow
def test_train_then_sample_points(tmp_path, capsys):
    assert (
        _train(tmp_path, "--method", "lsd", "--data", "checkerboard", "--steps", "20")
        == 0
    )
    out = capsys.readouterr().out
    run = tmp_path / "run"
    for name in ("run.json", "model.eqx", "train.eqx"):
        assert (run / name).exists() and str(run / name) in out
    assert "fmcalc sample --run" in out
    picture = tmp_path / "p.png"
    code = main(["sample", "--run", str(run), "--steps", "1", "2", "--n", "50",
                 "--plot", str(picture)])  # fmt: skip
    assert code == 0
    samples = np.load(run / "samples.npy")
    assert samples.shape == (2, 50, 2) and np.isfinite(samples).all()
    assert picture.stat().st_size > 1000
    # The run, loaded into Python: the same map and the same samples.
    loaded = fmcalc.load_run(run)
    assert loaded.method.name == "lsd" and loaded.settings["steps"] == 20
    assert loaded.model is not None and loaded.ema is not None
    drawn = fmcalc.sample_batch(
        loaded.ema,
        np.zeros((3, 2), np.float32),
        steps=1,
        kind=loaded.settings["sampling"],
    )
    assert loaded.to_data_units(drawn).shape == (3, 2)
    with pytest.raises(FileNotFoundError, match="not a finished run of `fmcalc train`"):
        fmcalc.load_run(tmp_path)
    # The same command resumes; the run is finished, so nothing is trained.
    before = (run / "model.eqx").read_bytes()
    lsd = ("--method", "lsd", "--data", "checkerboard")
    assert _train(tmp_path, *lsd, "--steps", "20") == 0
    assert "step 20" in capsys.readouterr().out
    assert (run / "model.eqx").read_bytes() == before
    assert json.loads((run / "run.json").read_text())["steps"] == 20
    # Another budget or method in the same folder is refused.
    assert _train(tmp_path, *lsd, "--steps", "30") == 2
    assert _train(tmp_path, "--method", "meanflow", "--data", "checkerboard") == 2
    assert "choose another --out" in capsys.readouterr().err


@pytest.mark.slow
def test_distillation_trains_its_teacher_first(tmp_path, capsys):
    code = _train(
        tmp_path, "--method", "splitmeanflow", "--data", "moons", "--steps", "10"
    )
    assert code == 0
    assert "flow-matching reference (the teacher)" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "reference.eqx").exists()
    target = tmp_path / "s.npy"
    assert main(["sample", "--run", str(run), "--steps", "1", "--n", "20",
                 "--out", str(target)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(reference)" in out and np.load(target).shape == (1, 20, 2)


@pytest.mark.slow
def test_own_images_with_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (40, 4, 4)).astype(np.uint8))
    np.save(tmp_path / "y.npy", np.arange(40) % 2)
    code = _train(tmp_path, "--method", "meanflow", "--data", str(tmp_path / "x.npy"),
                  "--labels", str(tmp_path / "y.npy"), "--steps", "5",
                  "--batch-size", "8")  # fmt: skip
    assert code == 0
    picture = tmp_path / "grid.png"
    assert main(["sample", "--run", str(tmp_path / "run"), "--steps", "1",
                 "--n", "20", "--plot", str(picture)]) == 0  # fmt: skip
    samples = np.load(tmp_path / "run" / "samples.npy")
    assert samples.shape == (1, 20, 4, 4) and picture.exists()


@pytest.mark.slow
def test_one_jump_methods_skip_more_steps(tmp_path, capsys):
    assert _train(tmp_path, "--method", "pid", "--data", "ring", "--steps", "5") == 0
    assert main(["sample", "--run", str(tmp_path / "run"), "--steps", "1", "2",
                 "--n", "10"]) == 0  # fmt: skip
    assert "2 steps skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_digits(tmp_path, capsys):
    assert _train(tmp_path, "--method", "lsd", "--data", "digits", "--steps", "20") == 0
    assert main(["sample", "--run", str(tmp_path / "run"), "--steps", "1",
                 "--plot", str(tmp_path / "d.png")]) == 0  # fmt: skip
    assert np.load(tmp_path / "run" / "samples.npy").shape == (1, 100, 8, 8)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope", "--data", "ring"], "Unknown method"),
        (["--method", "lsd", "--data", "nowhere"], "Unknown data set"),
        (["--method", "lsd", "--data", "ring", "--labels", "y.npy"], "own labels"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, message):
    assert _train(tmp_path, *args) == 2
    assert message in capsys.readouterr().err


def test_sample_needs_a_run(tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_run, "train", interrupted)
    assert _train(tmp_path, "--method", "lsd", "--data", "ring") == 130
    assert "run the same command to resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "given, expected", [([], "run"), (["--schedules", "paper"], "paper")]
)
def test_schedules_switch_reaches_the_run(monkeypatch, given, expected):
    seen = {}
    monkeypatch.setattr(_run, "train", lambda *a, **k: seen.update(k))
    assert main(["train", "--method", "ect", "--data", "ring", *given]) == 0
    assert seen["schedules"] == expected


def test_schedules_switch_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "ect", "--data", "ring", "--schedules", "papers"])
    assert "'papers'" in capsys.readouterr().err


def test_set_reaches_the_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(_run, "train", lambda *a, **k: seen.update(k))
    assert main(["train", "--method", "lsd", "--data", "ring"]) == 0
    assert seen["sets"] == []
    assert main(["train", "--method", "lsd", "--data", "ring", "--set",
                 "loss=squared", "--set", "split=0.5,0.5"]) == 0  # fmt: skip
    assert seen["sets"] == ["loss=squared", "split=0.5,0.5"]


def _stop_before_training(monkeypatch, seen=None):
    """`fmcalc train` up to its first fit (run.json written), without building a
    network: the fit raises KeyboardInterrupt, as Ctrl-C would."""

    def stop(method, *args, **kwargs):
        if seen is not None:
            seen["method"] = method
        raise KeyboardInterrupt

    monkeypatch.setattr(_run, "_fit", stop)
    monkeypatch.setattr(_run.RunNetwork, "build", lambda self, seed: None)


def test_set_builds_the_variant_and_records_it(tmp_path, capsys, monkeypatch):
    seen = {}
    _stop_before_training(monkeypatch, seen)
    args = ("--method", "meanflow", "--data", "ring", "--set", "loss=squared")
    assert _train(tmp_path, *args) == 130
    method = seen["method"]
    assert method.name == "meanflow[loss=squared]"
    assert all(term.loss == fmcalc.SquaredError() for term in method.terms)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["method"] == "meanflow" and record["settings"] == ["loss=squared"]
    assert "meanflow[loss=squared]" in capsys.readouterr().out
    # Another setting, or none, is another run: the folder refuses it.
    assert _train(tmp_path, *args[:4], "--set", "loss=pseudo-huber") == 2
    assert "differs in ['settings']" in capsys.readouterr().err
    assert _train(tmp_path, *args[:4]) == 2
    # A variant named in brackets is the same run.
    assert _train(tmp_path, "--method", "meanflow[loss=squared]", "--data",
                  "ring") == 130  # fmt: skip


def test_run_folders_without_settings_still_resume(tmp_path, monkeypatch):
    _stop_before_training(monkeypatch)
    lsd = ("--method", "lsd", "--data", "ring")
    assert _train(tmp_path, *lsd) == 130
    path = tmp_path / "run" / "run.json"
    record = json.loads(path.read_text())
    del record["settings"]  # as written before `--set` existed
    path.write_text(json.dumps(record))
    assert _train(tmp_path, *lsd) == 130
    assert _train(tmp_path, *lsd, "--set", "loss=squared") == 2


def test_default_folder_names_the_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _stop_before_training(monkeypatch)
    assert main(["train", "--method", "lsd", "--data", "ring", "--set",
                 "split=0.5,0.5"]) == 130  # fmt: skip
    assert (tmp_path / "runs" / "lsd-split=0.5,0.5-ring" / "run.json").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--method", "meanflow-mse"], ["'meanflow-mse'",
                                         "--method meanflow --set loss=squared"]),
        (["--method", "lsd-central"], ["--method lsd --set derivative=central"]),
        (["--method", "meanflow-big"], ["--method meanflow --set OPTION=VALUE",
                                         "label_dropout"]),
        (["--method", "nope"], ["'nope'", "registered ones are flow-matching, "]),
        (["--method", "meanflow", "--set", "loss=mse"], ["'mse'", "squared"]),
        (["--method", "meanflow", "--set", "lossy=squared"], ["'lossy'", "derivative"]),
        (["--method", "meanflow", "--set", "loss"], ["'loss'", "KEY=VALUE"]),
    ],
)  # fmt: skip
def test_bad_variants_are_refused_with_their_spelling(tmp_path, capsys, args, words):
    assert _train(tmp_path, *args, "--data", "ring") == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_a_variant_then_sample(tmp_path, capsys):
    args = ("--method", "meanflow", "--set", "loss=squared", "--data", "ring")
    assert _train(tmp_path, *args, "--steps", "5") == 0
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["settings"] == ["loss=squared"]
    assert main(["sample", "--run", str(run), "--steps", "1", "--n", "10"]) == 0
    assert "meanflow[loss=squared], 1 step" in capsys.readouterr().out
    assert np.load(run / "samples.npy").shape == (1, 10, 2)
