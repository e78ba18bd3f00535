"""The search-and-recommendation data layer: raw logs in, a prepared SeqIO-readable dataset out.

Stages, each in its own module:
  loaders/      raw formats (MovieLens in the recbole wheel, Amazon 2014, generic CSV/parquet)
                -> `SearchRecLog` (schema.py)
  queries.py    category path -> query text; semi-synthetic search sessions
  samples.py    time-ordered histories, filtering, leave-one-out split
  candidates.py evaluation candidates (popularity and BM25 negatives)
  records.py    the on-disk format (TFRecord shards + TFDS metadata) that SeqIO reads
  prepared.py   opening a prepared dataset directory
"""
from gensar_jax.data.schema import DataError, SearchRecLog  # noqa: F401
