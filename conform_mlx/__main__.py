from conform_mlx.cli import main

raise SystemExit(main())
