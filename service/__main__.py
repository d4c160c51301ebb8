"""``python -m service`` is the same as the ``pairsieve`` console script."""

from service.cli import main

raise SystemExit(main())
