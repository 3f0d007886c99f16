"""Word and string helpers."""

import re
from collections import Counter

_NON_WORD = re.compile(r"[^a-z0-9]+")


def slugify(text, separator="-"):
    lowered = text.lower()
    slug = _NON_WORD.sub(separator, lowered)
    return slug.strip(separator)


def count_words(text):
    words = re.findall(r"\w+", text.lower())
    return Counter(words)


def truncate(text, width, suffix="..."):
    if len(text) <= width:
        return text
    keep = width - len(suffix)
    return text[:keep] + suffix


def capitalize_words(text):
    parts = []
    for word in text.split(" "):
        if word and not word.isupper():
            word = word[0].upper() + word[1:]
        parts.append(word)
    return " ".join(parts)


def is_palindrome(text):
    letters = [c for c in text.lower() if c.isalnum()]
    return letters == letters[::-1]


def reverse_words(text):
    words = text.split()
    return " ".join(reversed(words))


def pad(text, width, fill=" "):
    missing = width - len(text)
    if missing <= 0:
        return text
    left = missing // 2
    right = missing - left
    return fill * left + text + fill * right
