"""rlsub-tui: do RL fine-tunes from different seeds update the same parameters?"""

__version__ = "0.1.0"
