from calc.stats import histogram, median, percentile, running_max, variance


def test_variance():
    assert variance([2, 4, 4, 4, 5, 5, 7, 9]) == 4.0


def test_median():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5


def test_percentile():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 0) == 1
    assert percentile([1, 2, 3, 4, 5], 100) == 5
    assert percentile([10, 20], 25) == 12.5


def test_running_max():
    assert running_max([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]


def test_histogram():
    assert histogram([0.5, 1.5, 1.7, 9.9], 5, 0, 10) == [3, 0, 0, 0, 1]
    assert histogram([-5, 15], 2, 0, 10) == [1, 1]
