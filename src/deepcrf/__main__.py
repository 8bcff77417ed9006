"""``python -m deepcrf`` runs the command line."""

from deepcrf.cli import main

raise SystemExit(main())
