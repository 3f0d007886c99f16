"""calc: small arithmetic and statistics helpers (a fixture repository for ForagerAgent)."""

from calc.arith import add, clamp, divide, gcd, hypot, is_even, mean, power_sum, product, scale, sign
from calc.stats import histogram, median, percentile, running_max, variance
