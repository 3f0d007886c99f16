"""Arithmetic helpers."""

import math
from functools import reduce


def add(a, b):
    return a + b


def clamp(value, low, high):
    if value < low:
        return low
    if value > high:
        return high
    return value


def mean(values):
    if not values:
        raise ValueError("mean of an empty sequence")
    total = 0
    for v in values:
        total += v
    return total / len(values)


def gcd(a, b):
    while b != 0:
        a, b = b, a % b
    return abs(a)


def hypot(x, y):
    return math.sqrt(x * x + y * y)


def product(values, start=1):
    return reduce(lambda acc, v: acc * v, values, start)


def power_sum(values, exponent):
    result = 0
    for v in values:
        result = result + v ** exponent
    return result


def is_even(n):
    return n % 2 == 0


def sign(x):
    if x > 0:
        return 1
    elif x < 0:
        return -1
    return 0


def scale(values, factor, offset=0):
    out = []
    for v in values:
        out.append(v * factor + offset)
    return out


def divide(numerator, denominator):
    if denominator == 0:
        raise ZeroDivisionError("denominator is zero")
    return numerator / denominator
