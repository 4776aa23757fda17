"""Results: one SQLite store for accuracy and speed rows (one key rule, one label), their statistics, plots and
rendering. The report that assembles them is :mod:`tokensieve.report`."""
