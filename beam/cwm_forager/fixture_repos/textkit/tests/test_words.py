from textkit.words import (capitalize_words, count_words, is_palindrome, pad, reverse_words,
                           slugify, truncate)


def test_slugify():
    assert slugify("Hello, World!") == "hello-world"
    assert slugify("  A  b ", separator="_") == "a_b"


def test_count_words():
    counts = count_words("the cat and the hat")
    assert counts["the"] == 2
    assert counts["cat"] == 1


def test_truncate():
    assert truncate("short", 10) == "short"
    assert truncate("a long sentence", 8) == "a lon..."
    assert truncate("exactly", 7) == "exactly"


def test_capitalize_words():
    assert capitalize_words("hello big world") == "Hello Big World"
    assert capitalize_words("NASA rocks") == "NASA Rocks"


def test_is_palindrome():
    assert is_palindrome("A man, a plan, a canal: Panama")
    assert not is_palindrome("palindrome")


def test_reverse_words():
    assert reverse_words("one two three") == "three two one"


def test_pad():
    assert pad("ab", 6) == "  ab  "
    assert pad("ab", 5, "*") == "*ab**"
    assert pad("abcdef", 3) == "abcdef"
