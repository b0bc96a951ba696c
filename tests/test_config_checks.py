"""The config field checks: messages name the field by its flag path and the bad value."""

import math

import ml_collections
import pytest

from fdrl import config_checks


def _config():
    return ml_collections.ConfigDict(dict(steps=10, beta=0.1, flag=True, dtype="bfloat16", ppo=dict(epochs=2, gamma=1.0)))


def test_good_values_are_returned():
    c = _config()
    assert config_checks.check_int(c, "ppo.epochs", low=1) == 2
    assert config_checks.check_number(c, "ppo.gamma", low=0, high=1) == 1.0  # closed bound
    assert config_checks.check_number(c, "beta", low=0, low_open=True) == 0.1
    assert config_checks.check_number(c, "steps", low=0) == 10  # an integer is a number
    assert config_checks.check_choice(c, "dtype", ("float32", "bfloat16")) == "bfloat16"
    assert config_checks.check_float_dtype(c, "dtype") == "bfloat16"


@pytest.mark.parametrize("call, message", [
    (lambda c: config_checks.check_int(c, "ppo.epochs", low=3), "ppo.epochs=2 must be an integer >= 3"),
    (lambda c: config_checks.check_int(c, "steps", high=5), "steps=10 must be an integer <= 5"),
    (lambda c: config_checks.check_int(c, "beta", low=0), "beta=0.1 must be an integer >= 0"),
    (lambda c: config_checks.check_int(c, "flag", low=0), "flag=True must be an integer >= 0"),  # a bool is not
    (lambda c: config_checks.check_number(c, "ppo.gamma", low=0, high=1, high_open=True),
     r"ppo.gamma=1.0 must be a finite number in \[0, 1\)"),
    (lambda c: config_checks.check_number(c, "beta", low=0.1, low_open=True), "beta=0.1 must be a finite number > 0.1"),
    (lambda c: config_checks.check_number(c, "dtype"), "dtype='bfloat16' must be a finite number$"),
    (lambda c: config_checks.check_choice(c, "dtype", ("a", "b")), r"unknown dtype='bfloat16'; choose one of \('a', 'b'\)"),
    (lambda c: config_checks.check_float_dtype(c, "steps"), "steps=10 must name a floating-point dtype"),
])
def test_bad_values_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(_config())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_even_without_bounds(value):
    c = _config()
    c.beta = value
    with pytest.raises(ValueError, match=f"beta={value!r} must be a finite number"):
        config_checks.check_number(c, "beta")


@pytest.mark.parametrize("name", ["int8", "int32", "bool", "not_a_dtype"])
def test_float_dtype_refuses_other_dtypes(name):
    c = _config()
    c.dtype = name
    with pytest.raises(ValueError, match=f"dtype='{name}' must name a floating-point dtype"):
        config_checks.check_float_dtype(c, "dtype")
    c.dtype = ""
    assert config_checks.check_float_dtype(c, "dtype", allow_empty=True) == ""
    with pytest.raises(ValueError, match="dtype='' must name"):
        config_checks.check_float_dtype(c, "dtype")
