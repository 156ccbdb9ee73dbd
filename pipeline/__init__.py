"""20 Newsgroups pipeline: one module per DVC stage plus a few shared modules."""
