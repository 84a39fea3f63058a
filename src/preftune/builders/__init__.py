"""Generators that turn compact specs into preference pairs (e.g. template.py: claims x phrasings)."""
