"""Fossil's spool directory (email-send-method=dir): one file per message, state beside it."""

from mailrelayd.queues.spool.queue import SpoolQueue

__all__ = ["SpoolQueue"]
