"""Commands around the pipeline (not DVC stages): gate, predict, ui, plot page."""
