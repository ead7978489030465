from rlsub_tui.cli import main

raise SystemExit(main())
