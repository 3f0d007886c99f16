import pytest

from calc.arith import add, clamp, divide, gcd, hypot, is_even, mean, power_sum, product, scale, sign


def test_add():
    assert add(2, 3) == 5
    assert add(-1, 1) == 0


def test_clamp():
    assert clamp(5, 0, 10) == 5
    assert clamp(-3, 0, 10) == 0
    assert clamp(42, 0, 10) == 10
    assert clamp(0, 0, 10) == 0


def test_mean():
    assert mean([1, 2, 3, 4]) == 2.5
    with pytest.raises(ValueError):
        mean([])


def test_gcd():
    assert gcd(12, 18) == 6
    assert gcd(7, 5) == 1
    assert gcd(-4, 6) == 2


def test_hypot():
    assert hypot(3, 4) == 5.0


def test_product():
    assert product([2, 3, 4]) == 24
    assert product([], start=7) == 7


def test_power_sum():
    assert power_sum([1, 2, 3], 2) == 14
    assert power_sum([2], 3) == 8


def test_is_even():
    assert is_even(4)
    assert not is_even(7)


def test_sign():
    assert sign(3) == 1
    assert sign(-2) == -1
    assert sign(0) == 0


def test_scale():
    assert scale([1, 2], 3) == [3, 6]
    assert scale([1, 2], 2, offset=1) == [3, 5]


def test_divide():
    assert divide(7, 2) == 3.5
    with pytest.raises(ZeroDivisionError):
        divide(1, 0)
