from moesaic.cli.main import main

raise SystemExit(main())
