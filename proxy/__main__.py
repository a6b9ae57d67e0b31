"""`python -m proxy` is the same as the `cpi-proxy` console script."""

from proxy.cli import main

raise SystemExit(main())
