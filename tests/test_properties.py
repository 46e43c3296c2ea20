"""Property tests (hypothesis) of what a user types before anything runs (issue 10, item 6): the `--set` parser,
each registered method's hparam resolution and validation, and RunConfig's validation and key.

Ranges are read from the code that declares them: a method's search space (``search_space``, Optuna's
define-by-run space, recorded by a trial double that draws inside each declared distribution) and its validation
interval (the one ``check_range`` prints, methods/base.py), so a new method is covered without editing this file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from regbench import registry
from regbench.config import NOT_KEYED, OPTIMIZERS, SCHEDULES, RunConfig, parse_sets
from regbench.errors import ConfigError, RegbenchError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
METHODS = registry.method_names()
COMPOSITES = ["ses+shade", "dropout+spectral_norm"]
INTERVAL = re.compile(r"is outside ([\[(])(\S+), (\S+)([\])])$")


def one_line(exc: BaseException) -> bool:
    text = str(exc)
    return bool(text.strip()) and text.splitlines() == [text]


# ---- --set METHOD.HPARAM=VALUE ----------------------------------------------------------------------------------

method_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\+[a-z][a-z0-9_]{0,8})?", fullmatch=True)
hparam_names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}(\.[a-z_][a-z0-9_]{0,8})?", fullmatch=True)
values = st.text(min_size=1, max_size=20).filter(lambda v: v.strip())


@SETTINGS
@given(st.lists(st.tuples(method_names, hparam_names, values), min_size=1, max_size=6))
def test_well_formed_sets_round_trip(items):
    methods = sorted({m for m, _, _ in items})
    expected: dict[str, dict[str, str]] = {}
    for m, h, v in items:  # a later --set of the same hparam wins, as on the command line
        expected.setdefault(m, {})[h] = v.strip()
    assert parse_sets([f"{m}.{h}={v}" for m, h, v in items], methods) == expected


@SETTINGS
@given(st.text(max_size=40), st.lists(method_names, max_size=3))
def test_any_string_parses_or_is_one_line_config_error(item, methods):
    try:
        got = parse_sets([item], methods)
    except ConfigError as exc:
        assert one_line(exc), str(exc)
        return
    # accepted: it really was METHOD.HPARAM=VALUE for a method of --methods
    (method, sets), = got.items()
    (hparam, value), = sets.items()
    assert method in methods and hparam and value and value == value.strip()
    assert item.strip().startswith(f"{method}.{hparam}".strip()) and "=" in item


@SETTINGS
@given(method_names, hparam_names, values,
       st.sampled_from(["no =", "no .", "no method", "no hparam", "blank value"]))
def test_near_misses_are_malformed(method, hparam, value, breakage):
    item = {"no =": f"{method}.{hparam}{value}".replace("=", ""),
            "no .": f"{method}{hparam}={value}".replace(".", "", 1) if "." not in method + hparam
            else f"{method}_{hparam.replace('.', '_')}={value}",
            "no method": f".{hparam}={value}",
            "no hparam": f"{method}.={value}",
            "blank value": f"{method}.{hparam}= \t "}[breakage]
    with pytest.raises(ConfigError, match="malformed --set") as err:
        parse_sets([item], [method])
    assert one_line(err.value)


@SETTINGS
@given(st.sampled_from(["ses", "shade"]), hparam_names, st.text(max_size=12).filter(lambda v: v.strip()))
def test_set_naming_a_part_of_a_composite_is_one_line(part, hparam, value):
    """The hint spells out the composite's namespaced form; odd characters in it must not break the line."""
    with pytest.raises(ConfigError, match="not in --methods") as err:
        parse_sets([f"{part}.{hparam}={value}"], ["baseline", "ses+shade"])
    assert one_line(err.value)


# ---- each method's hparams --------------------------------------------------------------------------------------

class DrawingTrial:
    """Optuna's suggest_* API, answered by hypothesis draws inside each declared distribution."""

    def __init__(self, draw):
        self.draw = draw

    def suggest_float(self, name, low, high, *, log=False, step=None):
        return self.draw(st.floats(low, high, allow_nan=False), label=name)

    def suggest_int(self, name, low, high, *, log=False, step=1):
        return self.draw(st.integers(low, high), label=name)

    def suggest_categorical(self, name, choices):
        return self.draw(st.sampled_from(list(choices)), label=name)


@SETTINGS
@given(st.sampled_from(METHODS + COMPOSITES), st.data())
def test_search_space_values_resolve_also_as_set_strings(name, data):
    cls = registry.method_class(name)
    space = cls.search_space(DrawingTrial(data.draw))
    assert cls.resolve(space) == {**cls.defaults, **space}
    # what `--set name.hp=VALUE` hands over: the same values as text
    typed = cls.resolve({k: (repr(v) if isinstance(v, float) else str(v)) for k, v in space.items()})
    assert typed == {**cls.defaults, **space}


def _declared_interval(cls, hp):
    """The interval validate() enforces on numeric hparam ``hp``, as check_range prints it, or None."""
    for probe in ("nan", "-1e300", "1e300", "-1000000000000", "1000000000000"):
        try:
            cls.resolve({hp: probe})
        except RegbenchError as exc:
            found = INTERVAL.search(str(exc))
            if found:
                lo_open, lo, hi, hi_open = found.groups()
                return float(lo), float(hi), lo_open == "(", hi_open == ")"
    return None


NUMERIC = [(name, hp) for name in METHODS for hp, v in registry.method_class(name).defaults.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_every_numeric_hparam_declares_an_interval():
    assert NUMERIC, "no registered method has a numeric hparam"
    missing = [f"{n}.{hp}" for n, hp in NUMERIC if _declared_interval(registry.method_class(n), hp) is None]
    assert not missing, f"no check_range interval for {missing}"


@SETTINGS
@given(st.sampled_from(NUMERIC), st.data())
def test_numeric_hparams_resolve_inside_their_interval_and_fail_outside(case, data):
    name, hp = case
    cls = registry.method_class(name)
    lo, hi, lo_open, hi_open = _declared_interval(cls, hp)
    is_int = isinstance(cls.defaults[hp], int)
    value = data.draw(st.integers(-10**6, 10**6) if is_int else st.floats(allow_nan=True, allow_infinity=True)
                      | st.floats(lo if math.isfinite(lo) else -1e6, hi if math.isfinite(hi) else 1e6))
    inside = (value > lo or (value == lo and not lo_open)) and (value < hi or (value == hi and not hi_open))
    try:
        resolved = cls.resolve({hp: str(value) if is_int else repr(value)})
    except RegbenchError as exc:
        assert one_line(exc), str(exc)
        assert f"{name}.{hp}=" in str(exc)
        # inside the interval only a rule coupling hparams (e.g. drop_path_rate needs placement='timm') may refuse
        assert not inside or "is outside" not in str(exc), (value, str(exc))
        return
    assert inside, f"{name}.{hp}={value!r} resolved although outside the declared interval"
    assert resolved[hp] == value


@pytest.mark.parametrize("case", [c for c in NUMERIC if isinstance(registry.method_class(c[0]).defaults[c[1]], float)],
                         ids="{0[0]}.{0[1]}".format)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_no_float_hparam_takes_a_non_finite_value(case, value):
    # Found by the property test above in CI: confidence_penalty.beta=inf passed "[0, inf)" (an absent upper bound).
    name, hp = case
    with pytest.raises(RegbenchError, match=f"{name}.{hp}=.* is outside"):
        registry.method_class(name).resolve({hp: value})


@SETTINGS
@given(st.sampled_from(METHODS + COMPOSITES), st.data(), st.text(max_size=30))
def test_arbitrary_text_raises_only_one_line_regbench_errors(name, data, text):
    cls = registry.method_class(name)
    hp = data.draw(st.sampled_from(sorted(cls.defaults)) | st.text(max_size=10) if cls.defaults
                   else st.text(max_size=10))
    try:
        cls.resolve({hp: text})
    except RegbenchError as exc:
        assert one_line(exc), str(exc)


# ---- RunConfig ----------------------------------------------------------------------------------------------------

json_values = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(-1e6, 1e6) | st.text(max_size=8)
hparam_dicts = st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=5)
ODD_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0]  # what `--lr nan` / `--weight-decay inf` hand over
valid_configs = st.builds(
    RunConfig,
    method=st.sampled_from(METHODS), dataset=st.sampled_from(["mnist1d", "digits", "cifar10"]),
    model=st.sampled_from(["cnn1d", "mlp", "resnet18"]), hparams=hparam_dicts,
    split_seed=st.integers(0, 100), train_size=st.none() | st.integers(10, 10**5),
    optimizer=st.sampled_from(OPTIMIZERS), schedule=st.sampled_from(SCHEDULES),
    lr=st.floats(1e-6, 10.0), weight_decay=st.floats(0.0, 1.0), epochs=st.integers(1, 500),
    batch_size=st.integers(1, 4096), seed=st.integers(0, 10**6),
    device=st.sampled_from(["auto", "cpu", "cuda"]), data_dir=st.text(max_size=12),
    augment=st.sampled_from([None, "crop_flip"]), shift=st.none() | st.sampled_from(["digits_c_style"]),
)


@SETTINGS
@given(st.fixed_dictionaries({}, optional={
    "optimizer": st.text(max_size=8) | st.sampled_from(OPTIMIZERS),
    "schedule": st.text(max_size=8) | st.sampled_from(SCHEDULES),
    "epochs": st.integers(-5, 5), "batch_size": st.integers(-5, 5),
    "lr": st.floats() | st.sampled_from(ODD_FLOATS), "weight_decay": st.floats() | st.sampled_from(ODD_FLOATS),
    "train_size": st.none() | st.integers(-5, 5000), "train_per_class": st.none() | st.integers(-5, 50)}))
def test_run_config_accepts_only_valid_options_and_says_why_in_one_line(fields):
    try:
        cfg = RunConfig(method="baseline", dataset="mnist1d", model="cnn1d", **fields)
    except ConfigError as exc:
        assert one_line(exc), str(exc)
        return
    assert cfg.optimizer in OPTIMIZERS and cfg.schedule in SCHEDULES
    assert cfg.epochs >= 1 and cfg.batch_size >= 1
    assert 0 < cfg.lr < math.inf and 0 <= cfg.weight_decay < math.inf  # NaN fails both
    assert cfg.train_size is None or cfg.train_per_class is None
    assert cfg.train_per_class is None or cfg.train_per_class >= 1


@SETTINGS
@given(valid_configs, st.randoms(use_true_random=False))
def test_key_is_stable_under_dict_order_and_json_round_trip(cfg, rnd):
    items = list(cfg.hparams.items())
    rnd.shuffle(items)
    shuffled = cfg.replace(hparams=dict(items))
    assert shuffled.key() == cfg.key() and shuffled.group_key() == cfg.group_key()
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg and again.key() == cfg.key()
    assert json.loads(cfg.to_json()) == json.loads(again.to_json())


KEYED_CHANGES = {
    "method": st.sampled_from(METHODS), "dataset": st.text(max_size=6), "model": st.text(max_size=6),
    "hparams": hparam_dicts, "split_seed": st.integers(0, 10**6), "train_size": st.none() | st.integers(10, 10**6),
    "optimizer": st.sampled_from(OPTIMIZERS), "lr": st.floats(1e-6, 10.0), "weight_decay": st.floats(0.0, 1.0),
    "schedule": st.sampled_from(SCHEDULES), "epochs": st.integers(1, 10**4), "batch_size": st.integers(1, 10**4),
    "seed": st.integers(0, 10**6), "momentum": st.floats(0.0, 1.0), "augment": st.sampled_from([None, "crop_flip"]),
    "shift": st.none() | st.text(min_size=1, max_size=6), "split_hash": st.none() | st.text(min_size=1, max_size=6),
}
KEYED_CHANGES.update(model_kwargs=hparam_dicts, train_per_class=st.none() | st.integers(1, 100),
                     train_acc_sample=st.none() | st.integers(1, 10**6))
BY_TYPE = {str: st.text(max_size=12), bool: st.booleans(), int: st.integers(), float: st.floats(allow_nan=False)}
NOT_KEYED_CHANGES = {f.name: BY_TYPE[type(f.default)] for f in dataclasses.fields(RunConfig) if f.name in NOT_KEYED}


def test_every_field_is_tested_as_keyed_or_not():
    """A field added later (and its place in NOT_KEYED or not) is covered by the two key properties below."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(NOT_KEYED_CHANGES) == set(NOT_KEYED) and fields == set(KEYED_CHANGES) | set(NOT_KEYED)


@SETTINGS
@given(valid_configs, st.sampled_from(sorted(KEYED_CHANGES)), st.data())
def test_key_changes_when_a_keyed_field_changes(cfg, name, data):
    new = data.draw(KEYED_CHANGES[name], label=name)
    assume(name != "train_per_class" or cfg.train_size is None)  # both set is refused (tested above)
    assume(json.dumps(new, sort_keys=True) != json.dumps(getattr(cfg, name), sort_keys=True))
    changed = cfg.replace(**{name: new})
    assert changed.key() != cfg.key()
    assert (changed.group_key() == cfg.group_key()) == (name == "seed")


@SETTINGS
@given(valid_configs, st.sampled_from(sorted(NOT_KEYED_CHANGES)), st.data())
def test_key_ignores_where_and_on_what_a_run_happens(cfg, name, data):
    changed = cfg.replace(**{name: data.draw(NOT_KEYED_CHANGES[name], label=name)})
    assert changed.key() == cfg.key() and changed.group_key() == cfg.group_key()
