"""Data sources: a data source turns raw input into the documents table, one module each.

:mod:`~pipeline.sources.bydate` reads the 20 Newsgroups "bydate" archive;
:mod:`~pipeline.sources.documents` builds the final table (strip, split, subsample) and
its report from a source's raw posts.
"""
