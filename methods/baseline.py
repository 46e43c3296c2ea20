"""No regularizer: the reference every other method is compared against."""
from .base import Method


class Baseline(Method):
    name = "baseline"
    description = "no regularizer (task loss only); the reference row of every leaderboard"
    defaults: dict = {}
