from mailrelayd.cli import main

raise SystemExit(main())
