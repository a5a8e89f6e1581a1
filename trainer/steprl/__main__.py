"""``python -m steprl ...`` is the same as the ``steprl`` console script."""

from steprl.cli import main

raise SystemExit(main())
