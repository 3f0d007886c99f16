"""textkit: string helpers (a fixture repository for ForagerAgent)."""

from textkit.words import (capitalize_words, count_words, is_palindrome, pad, reverse_words,
                           slugify, truncate)
