"""`fmcalc.methods.parse` and `fmcalc.methods.settings`: a method's variant named by
one string, its values read by each option's declared type, and refusals that name
the text and say what would be right."""

import pytest

import fmcalc
from fmcalc import methods


@pytest.mark.parametrize(
    "name, sets, expected",
    [
        ("ctm", ["fraction=0.25"], {"fraction": 0.25}),
        ("ctm", ["fraction=1e-1"], {"fraction": 0.1}),
        ("psd", ["midpoint=true"], {"midpoint": True}),
        ("psd", ["midpoint=False"], {"midpoint": False}),
        ("lsd", ["split=0.5,0.5"], {"split": (0.5, 0.5)}),
        ("lsd", ["split = 0.5, 0.5"], {"split": (0.5, 0.5)}),
        ("sct", ["c=None"], {"c": None}),
        ("sct", ["c=0.2"], {"c": 0.2}),
        ("meanflow", ["guidance=none"], {"guidance": None}),
        ("meanflow", ["label-dropout=0.1"], {"label_dropout": 0.1}),
        ("freeflow", ["stop_gradient=none"], {"stop_gradient": "none"}),
        ("meanflow", ["loss=squared"], {"loss": fmcalc.SquaredError()}),
        ("meanflow", ["loss=adaptive"], {"loss": fmcalc.Adaptive()}),
        ("lsd", ["loss=pseudo-huber"], {"loss": fmcalc.PseudoHuber()}),
        ("pid", ["derivative=jvp"], {"derivative": fmcalc.JVP()}),
        ("meanflow", ["derivative=fd"], {"derivative": fmcalc.FiniteDifference(1e-3)}),
        (
            "meanflow",
            ["derivative=central"],
            {"derivative": fmcalc.FiniteDifference(5e-3, "central")},
        ),
        (
            "meanflow",
            ["derivative=FD:0.002"],
            {"derivative": fmcalc.FiniteDifference(2e-3)},
        ),
        ("lmd", ["velocity=conditional"], {"velocity": fmcalc.ConditionalVelocity()}),
        ("lmd", ["velocity=teacher"], {"velocity": fmcalc.Teacher()}),
        ("lsd", ["split=0.5,0.5", "loss=squared"], {"split": (0.5, 0.5),
                                                    "loss": fmcalc.SquaredError()}),
    ],
)  # fmt: skip
def test_settings_read_each_kind_of_value(name, sets, expected):
    assert methods.settings(name, sets) == expected


def test_variant_equals_the_keyword_build():
    variant = methods.parse("meanflow[loss=squared]")
    same = methods.get("meanflow", loss=fmcalc.SquaredError())
    assert variant.terms == same.terms
    assert variant.name == "meanflow[loss=squared]"
    assert str(variant) == str(same).replace("meanflow (", "meanflow[loss=squared] (")
    assert variant.biased is None  # squared error does not shift the fixed point
    assert variant.replace(name="meanflow") == same


def test_brackets_and_sets_combine():
    a = methods.parse("lsd[split=0.5,0.5,loss=squared]")
    b = methods.parse("lsd", ["split=0.5, 0.5", "loss=squared"])
    c = methods.parse(" lsd [ split=0.5,0.5 ] ", ["loss=squared"])
    assert a == b == c
    assert a.name == "lsd[split=0.5,0.5,loss=squared]"
    assert a.split == (0.5, 0.5)


def test_a_plain_name_is_the_registry_method():
    assert methods.parse("meanflow") == methods.get("meanflow")
    assert methods.parse("meanflow[]").name == "meanflow"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("meanflow[loss=mse]", ["'mse'", "squared, adaptive, pseudo-huber"]),
        ("meanflow[lossy=squared]", ["'lossy'", "derivative, times, loss"]),
        ("lsd[split=0.5]", ["'0.5'", "2 comma-separated", "0.5,0.5"]),
        ("lsd[split=0.5,x]", ["'0.5,x'", "2 comma-separated"]),
        ("ctm[fraction=lots]", ["'lots'", "a finite number"]),
        ("ctm[fraction=nan]", ["'nan'", "a finite number"]),
        ("psd[midpoint=maybe]", ["'maybe'", "true or false"]),
        ("sct[c=abc]", ["'abc'", "a finite number", "None"]),
        ("ctm[fraction=None]", ["'None'", "a finite number"]),
        ("meanflow[derivative=fd:abc]", ["'fd:abc'", "fd:STEP"]),
        ("meanflow[derivative=fd:0]", ["'fd:0'", "(0, 0.25]"]),
        ("meanflow[derivative=sure]", ["'sure'", "jvp, fd, central"]),
        ("meanflow[guidance=cfg]", ["'cfg'", "MeanFlowGuidance", "Python"]),
        ("ect[ratio=3]", ["'3'", "AbstractSchedule", "Python"]),
        ("meanflow[loss]", ["'loss'", "KEY=VALUE"]),
        ("meanflow[loss=squared,loss=adaptive]", ["'loss'", "set twice"]),
        ("meanflow[loss=squared", ["'meanflow[loss=squared'", "NAME[KEY=VALUE"]),
        ("nope", ["'nope'", "registered ones", "meanflow"]),
        ("meanflow-mse", ["'meanflow-mse'", "meanflow[loss=squared]"]),
        ("ayf-lmd-fd", ["'ayf-lmd-fd'", "ayf-lmd[derivative=fd]"]),
        ("lsd-bigger", ["'lsd-bigger'", "lsd[OPTION=VALUE]", "split"]),
    ],
)
def test_bad_text_is_refused_by_name(spec, words):
    with pytest.raises(ValueError) as error:
        methods.parse(spec)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_sets_must_be_a_list():
    with pytest.raises(TypeError, match="list of 'KEY=VALUE'"):
        methods.settings("meanflow", "loss=squared")
    with pytest.raises(TypeError, match="list of 'KEY=VALUE'"):
        methods.parse("meanflow", "loss=squared")


def test_get_suggests_the_variant_of_a_made_up_name():
    with pytest.raises(ValueError, match=r"parse\('meanflow\[loss=squared\]'\)"):
        methods.get("meanflow-mse")
    with pytest.raises(ValueError, match=r"parse\('lsd\[split=0.5,0.5\]'\)"):
        methods.get("lsd[split=0.5,0.5]")
