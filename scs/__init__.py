"""SCS agent: a Twisted daemon that owns the Celery workers of one machine."""

__version__ = "0.1.0"
