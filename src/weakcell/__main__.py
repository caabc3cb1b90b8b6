from weakcell.cli import main

raise SystemExit(main())
