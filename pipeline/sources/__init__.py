"""Data sources: each turns raw input into the documents table (id, split, label, text).

:mod:`~pipeline.sources.bydate` reads the 20 Newsgroups "bydate" archive; a table reader
will sit beside it. :mod:`~pipeline.sources.documents` builds the final table and its
report from a source's raw posts.
"""
