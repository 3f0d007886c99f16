"""Descriptive statistics built on calc.arith."""

from calc.arith import clamp, divide, mean


def variance(values):
    m = mean(values)
    squares = [(v - m) ** 2 for v in values]
    return divide(sum(squares), len(values))


def median(values):
    ordered = sorted(values)
    n = len(ordered)
    middle = n // 2
    if n % 2 == 1:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values, q):
    ordered = sorted(values)
    rank = clamp(q, 0, 100) / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    weight = rank - low
    return ordered[low] * (1 - weight) + ordered[high] * weight


def running_max(values):
    best = None
    out = []
    for v in values:
        if best is None or v > best:
            best = v
        out.append(best)
    return out


def histogram(values, bins, low, high):
    counts = [0] * bins
    width = (high - low) / bins
    for v in values:
        index = int((v - low) / width)
        index = clamp(index, 0, bins - 1)
        counts[index] += 1
    return counts
