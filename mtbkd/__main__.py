"""``python -m mtbkd ...``: the ``mtbkd`` command."""

from mtbkd.cli import main

raise SystemExit(main())
