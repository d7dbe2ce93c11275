from tokenbus.cli import main

raise SystemExit(main())
