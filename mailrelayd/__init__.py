"""mailrelayd: hand the mail that jailed web apps queue to the real mail system."""

__version__ = "0.1.0"
