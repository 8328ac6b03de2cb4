from xlstm_metal.cli import main

raise SystemExit(main())
