"""sandport: reach every port of every sandbox, and say which hop is broken."""

__version__ = "0.1.0"
