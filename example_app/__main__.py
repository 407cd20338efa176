"""`python -m example_app`: placeholder until the demo lands."""

raise SystemExit("the demo app is not built yet")
