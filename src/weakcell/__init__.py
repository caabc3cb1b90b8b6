"""weakcell: weakly supervised single-cell protein localization on Human Protein Atlas images."""

__version__ = "0.1.0"
