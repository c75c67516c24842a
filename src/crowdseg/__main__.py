from crowdseg.cli import main

raise SystemExit(main())
