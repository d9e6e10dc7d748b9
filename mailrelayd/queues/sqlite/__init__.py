"""Fossil's SQLite queue (email-send-method=db): table `email(emailid, msg)`."""

from mailrelayd.queues.sqlite.queue import SqliteQueue

__all__ = ["SqliteQueue"]
