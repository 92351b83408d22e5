"""ksmlab: a laboratory for KSM x THP and the zero-page remap on THP split."""

__version__ = "0.1.0"
