from chexformer.cli import main

raise SystemExit(main())
