"""`python -m msvlad <command>`."""

from msvlad.cli import main

raise SystemExit(main())
