"""camrelay: a low-latency camera relay. Encode once, serve many."""

__version__ = "0.1.0"
