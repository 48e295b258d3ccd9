"""drstream: streaming disaster-recovery replication through an encrypted delta log."""

__version__ = "0.1.0"
