import sys

from mailrelayd.cli import run

sys.exit(run())
