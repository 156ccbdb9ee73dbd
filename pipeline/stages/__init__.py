"""DVC stage entry points: one module per stage of dvc.yaml, each a thin ``main()``."""
