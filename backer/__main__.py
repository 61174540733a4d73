"""`python -m backer` runs the command-line tool."""

from backer.cli import main

raise SystemExit(main())
